//! [`PipelineGraph`]: the stages of a [`Pipeline`](super::Pipeline) and the routes requests
//! actually took, as Mermaid or Graphviz text.

use std::fmt::{self, Write as _};

use super::StageStats;

/// A node of a [`PipelineGraph`]: where requests come in, a stage, or where they leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GraphNode<S> {
    /// Where every request comes in (the machine's [`start`](super::StateMachine::start)).
    Start,
    /// A stage.
    Stage(S),
    /// Where a request leaves with its result ([`Next::Done`](super::Next::Done)).
    Done,
    /// Where a request leaves with an error: its stage failed or panicked.
    Failed,
}

/// A route requests took, and how many took it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct GraphEdge<S> {
    /// Where the requests were.
    pub from: GraphNode<S>,
    /// Where they went next.
    pub to: GraphNode<S>,
    /// How many requests took this route (a request through a loop counts each time).
    pub requests: u64,
}

/// The picture of a pipeline: its stages with their live figures, and every route requests
/// actually took between them, with counts. From [`Pipeline::graph`](super::Pipeline::graph).
///
/// [`mermaid`](Self::mermaid) and [`dot`](Self::dot) render it as text for Mermaid (which
/// GitHub and many doc sites draw) or Graphviz (`dot -Tsvg`). A stage appears once a request
/// has been routed to it; edges count routes as the machine chose them.
///
/// The ETL example's pipeline after loading its 4,000-row sample (`stagepipe-etl --graph dot`,
/// drawn by `dot -Tsvg`): every record enters `Parse`, malformed ones leave there as errors.
///
#[doc = include_str!("../../docs/etl-pipeline.svg")]
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct PipelineGraph<S> {
    /// Each stage that has run, with its figures, in the order of their first runs.
    pub stages: Vec<(S, StageStats)>,
    /// Every route taken, in the order each was first taken from its source.
    pub edges: Vec<GraphEdge<S>>,
}

impl<S: Copy + PartialEq + fmt::Debug> PipelineGraph<S> {
    /// The requests that took the route `from → to` (0 if none did).
    pub fn requests(&self, from: GraphNode<S>, to: GraphNode<S>) -> u64 {
        self.edges
            .iter()
            .filter(|e| e.from == from && e.to == to)
            .map(|e| e.requests)
            .sum()
    }

    /// Every node that appears, stages in order, with an identifier usable in both languages.
    fn nodes(&self) -> Vec<(GraphNode<S>, String)> {
        let mut nodes = vec![(GraphNode::Start, String::from("start"))];
        let mut add = |node: GraphNode<S>| {
            if !nodes.iter().any(|(n, _)| *n == node) {
                let id = match node {
                    GraphNode::Start => String::from("start"),
                    GraphNode::Done => String::from("done"),
                    GraphNode::Failed => String::from("failed"),
                    GraphNode::Stage(_) => format!("s{}", nodes.len()),
                };
                nodes.push((node, id));
            }
        };
        for (stage, _) in &self.stages {
            add(GraphNode::Stage(*stage));
        }
        for edge in &self.edges {
            add(edge.from);
            add(edge.to);
        }
        nodes
    }

    fn id(nodes: &[(GraphNode<S>, String)], node: GraphNode<S>) -> &str {
        nodes
            .iter()
            .find(|(n, _)| *n == node)
            .map_or("?", |(_, id)| id)
    }

    /// A stage's label lines: its name, then its runs and mean time (if it has run).
    fn label(&self, node: GraphNode<S>) -> Vec<String> {
        match node {
            GraphNode::Start => vec![String::from("start")],
            GraphNode::Done => vec![String::from("done")],
            GraphNode::Failed => vec![String::from("failed")],
            GraphNode::Stage(stage) => {
                let mut lines = vec![format!("{stage:?}")];
                if let Some((_, st)) = self.stages.iter().find(|(s, _)| *s == stage) {
                    lines.push(format!("{} runs, mean {:.1?}", st.runs, st.mean));
                    if st.errors > 0 {
                        lines.push(format!("{} errors", st.errors));
                    }
                }
                lines
            }
        }
    }

    /// A node's label lines, each escaped for an output format and joined with `sep`.
    fn label_text(&self, node: GraphNode<S>, sep: &str, escape: impl Fn(&str) -> String) -> String {
        let lines: Vec<String> = self.label(node).iter().map(|l| escape(l)).collect();
        lines.join(sep)
    }

    /// The graph as a Mermaid flowchart (left to right), each stage labelled with its runs and
    /// mean time, each edge with its request count.
    ///
    pub fn mermaid(&self) -> String {
        let nodes = self.nodes();
        let mut out = String::from("flowchart LR\n");
        for (node, id) in &nodes {
            let text = self.label_text(*node, "<br/>", |l| l.replace('"', "#quot;"));
            let _ = match node {
                GraphNode::Start | GraphNode::Done => writeln!(out, "    {id}(({text}))"),
                GraphNode::Failed => writeln!(out, "    {id}[/{text}/]"),
                GraphNode::Stage(_) => writeln!(out, "    {id}[\"{text}\"]"),
            };
        }
        for e in &self.edges {
            let (from, to) = (Self::id(&nodes, e.from), Self::id(&nodes, e.to));
            let _ = writeln!(out, "    {from} -->|{}| {to}", e.requests);
        }
        out
    }

    /// The graph in Graphviz's DOT language (left to right), each stage labelled with its runs
    /// and mean time, each edge with its request count: `dot -Tsvg` draws it.
    pub fn dot(&self) -> String {
        let nodes = self.nodes();
        let mut out = String::from("digraph pipeline {\n    rankdir=LR;\n    node [shape=box];\n");
        for (node, id) in &nodes {
            let text = self.label_text(*node, "\\n", |l| {
                l.replace('\\', "\\\\").replace('"', "\\\"")
            });
            let shape = match node {
                GraphNode::Start => ", shape=circle",
                GraphNode::Done => ", shape=doublecircle",
                GraphNode::Failed => ", shape=octagon",
                GraphNode::Stage(_) => "",
            };
            let _ = writeln!(out, "    {id} [label=\"{text}\"{shape}];");
        }
        for e in &self.edges {
            let (from, to) = (Self::id(&nodes, e.from), Self::id(&nodes, e.to));
            let _ = writeln!(out, "    {from} -> {to} [label=\"{}\"];", e.requests);
        }
        out.push_str("}\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A stage whose name needs escaping in both languages.
    #[derive(Clone, Copy, PartialEq)]
    enum St {
        Parse,
        Quote,
    }

    impl fmt::Debug for St {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(match self {
                St::Parse => "Parse",
                St::Quote => r#"Say "hi" \o/"#,
            })
        }
    }

    fn graph() -> PipelineGraph<St> {
        let st = |runs, errors| StageStats {
            runs,
            errors,
            mean: Duration::from_millis(2),
            ..StageStats::default()
        };
        let edge = |from, to, requests| GraphEdge { from, to, requests };
        PipelineGraph {
            stages: vec![(St::Parse, st(3, 0)), (St::Quote, st(2, 1))],
            edges: vec![
                edge(GraphNode::Start, GraphNode::Stage(St::Parse), 3),
                edge(GraphNode::Stage(St::Parse), GraphNode::Stage(St::Quote), 2),
                edge(GraphNode::Stage(St::Parse), GraphNode::Done, 1),
                edge(GraphNode::Stage(St::Quote), GraphNode::Done, 1),
                edge(GraphNode::Stage(St::Quote), GraphNode::Failed, 1),
            ],
        }
    }

    #[test]
    fn mermaid_has_every_node_and_counted_edge() {
        let expected = r#"flowchart LR
    start((start))
    s1["Parse<br/>3 runs, mean 2.0ms"]
    s2["Say #quot;hi#quot; \o/<br/>2 runs, mean 2.0ms<br/>1 errors"]
    done((done))
    failed[/failed/]
    start -->|3| s1
    s1 -->|2| s2
    s1 -->|1| done
    s2 -->|1| done
    s2 -->|1| failed
"#;
        assert_eq!(graph().mermaid(), expected);
    }

    #[test]
    fn dot_escapes_names_and_labels_edges() {
        let expected = r#"digraph pipeline {
    rankdir=LR;
    node [shape=box];
    start [label="start", shape=circle];
    s1 [label="Parse\n3 runs, mean 2.0ms"];
    s2 [label="Say \"hi\" \\o/\n2 runs, mean 2.0ms\n1 errors"];
    done [label="done", shape=doublecircle];
    failed [label="failed", shape=octagon];
    start -> s1 [label="3"];
    s1 -> s2 [label="2"];
    s1 -> done [label="1"];
    s2 -> done [label="1"];
    s2 -> failed [label="1"];
}
"#;
        assert_eq!(graph().dot(), expected);
    }

    #[test]
    fn requests_sums_a_route() {
        let g = graph();
        assert_eq!(g.requests(GraphNode::Stage(St::Parse), GraphNode::Done), 1);
        assert_eq!(g.requests(GraphNode::Start, GraphNode::Stage(St::Parse)), 3);
        assert_eq!(g.requests(GraphNode::Done, GraphNode::Start), 0);
    }
}
