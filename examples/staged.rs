//! Hello world of staged pipelines: a three-stage machine that routes each request by its
//! data, and two request groups (two "callers") sharing one pipeline.
//!
//! ```text
//! cargo run --example staged
//! ```

use futures::StreamExt;
use stagepipe::prelude::*;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Stage {
    /// Trim and check the name.
    Validate,
    /// Greet people; names starting with `@` are teams and skip this stage.
    Greet,
    /// Stamp the result.
    Finish,
}

#[derive(Debug)]
struct Hello {
    name: String,
    text: String,
}

struct Greeter;

impl StateMachine for Greeter {
    type Stage = Stage;
    type Data = Hello;
    type Error = String;

    fn start(&self) -> Stage {
        Stage::Validate
    }

    async fn run(&self, stage: Stage, mut hello: Hello) -> Result<Next<Stage, Hello>, String> {
        match stage {
            Stage::Validate => {
                hello.name = hello.name.trim().to_string();
                if hello.name.is_empty() {
                    return Err("empty name".to_string());
                }
                // Route by the data.
                let next = if hello.name.starts_with('@') {
                    Stage::Finish
                } else {
                    Stage::Greet
                };
                Ok(Next::Stage(next, hello))
            }
            Stage::Greet => {
                hello.text = format!("Hello, {}!", hello.name);
                Ok(Next::Stage(Stage::Finish, hello))
            }
            Stage::Finish => {
                if hello.text.is_empty() {
                    hello.text = format!("Welcome, team {}.", &hello.name[1..]);
                }
                Ok(Next::Done(hello))
            }
        }
    }
}

fn hello(name: &str) -> Hello {
    Hello {
        name: name.to_string(),
        text: String::new(),
    }
}

#[tokio::main]
async fn main() {
    let pipeline = Pipeline::builder(Greeter).workers(4).build();

    // Two callers, each with its own group: ordered results for one, completion order for the other.
    let caller = |names: Vec<&'static str>, ordered: bool| {
        let pipeline = pipeline.clone();
        async move {
            let group = pipeline.group();
            let group = if ordered { group.ordered() } else { group };
            let (tx, results) = group.open();
            let submit = async move {
                for name in names {
                    tx.submit(hello(name)).await.expect("group open");
                }
            };
            let (_, results) = tokio::join!(submit, results.collect::<Vec<_>>());
            results
        }
    };
    let (a, b) = tokio::join!(
        caller(vec!["Ada", " Grace ", "@rustaceans", "", "Linus"], true),
        caller(vec!["@tokio", "Barbara"], false),
    );
    for (who, results) in [("caller A (ordered)", a), ("caller B", b)] {
        println!("{who}:");
        for r in results {
            match r {
                Ok(h) => println!("  {}", h.text),
                Err(e) => println!("  error: {e}"),
            }
        }
    }
    println!();
    println!("{}", pipeline.stats());
}
