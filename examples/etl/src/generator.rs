//! A deterministic generator of realistic food-inspection violation rows.
//!
//! The output has the real file's header and shape: quoted fields holding commas, quotes and
//! newlines, `viol_level` as `*`, `**` or `***`, passing inspections with no violation, a few
//! exact duplicates (the real file has them too), and a small share of malformed rows of every
//! kind the job rejects (see [`Malformed`]). The same `rows` and `seed` always give the same
//! bytes.

use std::collections::HashSet;
use std::io::{self, Write};

use crate::model::HEADER;

/// The kinds of malformed rows the generator plants, one problem per row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Malformed {
    /// A date field that does not parse (`2015-13-45 25:61:00`, `last tuesday`, ...).
    BadDate,
    /// A required field left empty (`licenseno`, `businessname` or `violdttm`).
    MissingField,
    /// A `viol_level` other than `*`, `**`, `***`.
    UnknownLevel,
    /// A record with fewer or more than 26 fields.
    ColumnCount,
}

/// The generator's settings.
#[derive(Clone, Debug)]
pub struct GenConfig {
    /// Data rows to write (the header not counted).
    pub rows: usize,
    /// The seed: the same seed and `rows` give the same file.
    pub seed: u64,
    /// One row in `malformed_every` is malformed (0: none).
    pub malformed_every: usize,
    /// One row in `duplicate_every` repeats an earlier violation row exactly (0: none).
    pub duplicate_every: usize,
}

impl GenConfig {
    /// `rows` rows from `seed`, with about 2% malformed rows and 0.5% duplicates.
    pub fn new(rows: usize, seed: u64) -> Self {
        GenConfig {
            rows,
            seed,
            malformed_every: 47,
            duplicate_every: 199,
        }
    }
}

/// SplitMix64: small, fast, and the same on every platform.
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.below(xs.len())]
    }
    fn chance(&mut self, one_in: usize) -> bool {
        one_in != 0 && self.below(one_in) == 0
    }
}

const NAME_A: &[&str] = &[
    "Golden",
    "Harbor",
    "Liberty",
    "Beacon",
    "Back Bay",
    "North End",
    "Copley",
    "Fenway",
    "Emerald",
    "Union",
    "Red Line",
    "Charles",
    "Old State",
    "Seaport",
    "Common",
    "Bunker Hill",
    "Dorchester",
    "Brighton",
    "Quincy",
    "Faneuil",
];
const NAME_B: &[&str] = &[
    "Pizza",
    "Grill",
    "Diner",
    "Cafe",
    "Sushi",
    "Bakery",
    "Tavern",
    "Noodle House",
    "Deli",
    "Taqueria",
    "Oyster Bar",
    "Market",
    "Kitchen",
    "Bistro",
    "Dumplings",
    "Subs",
];
const SUFFIX: &[&str] = &["", "", "", " Inc.", " LLC", ", Inc.", " & Co."];
const LAST: &[&str] = &[
    "Murphy", "Nguyen", "Silva", "O'Brien", "Rossi", "Chen", "Garcia", "Kelly", "Santos", "Patel",
];
const FIRST: &[&str] = &[
    "Maria", "John", "Linh", "Patrick", "Ana", "Wei", "Jose", "Sean", "Priya", "Giulia",
];
const STREET: &[&str] = &[
    "Washington St",
    "Tremont St",
    "Boylston St",
    "Hanover St",
    "Massachusetts Ave",
    "Commonwealth Ave",
    "Cambridge St",
    "Dorchester Ave",
    "Blue Hill Ave",
    "Centre St",
];
const CITY_ZIP: &[(&str, &str)] = &[
    ("Boston", "02108"),
    ("Boston", "02113"),
    ("Boston", "02116"),
    ("Roxbury", "02119"),
    ("Dorchester", "02124"),
    ("Jamaica Plain", "02130"),
    ("Brighton", "02135"),
    ("South Boston", "02127"),
];
const CATEGORY: &[(&str, &str)] = &[
    ("FS", "Eating & Drinking"),
    ("FT", "Eating & Drinking w/ Take Out"),
    ("RF", "Retail Food"),
    ("MFW", "Mobile Food Walk On"),
];
/// (code, level, description)
const VIOLATIONS: &[(&str, &str, &str)] = &[
    ("02-4-204.112", "*", "Thermometers Provided & Accurate"),
    ("04-4-602.13", "*", "Non-Food Contact Surfaces Clean"),
    ("06-4-501.11", "*", "Good Repair, Proper Design"),
    ("08-6-501.12", "*", "Premises Maintained"),
    ("10-5-205.15", "*", "Plumbing, Backflow, Floor Drains"),
    ("12-6-202.15", "*", "Insects, Rodents, Animals"),
    ("13-2-103.11", "**", "PIC Knowledge"),
    ("18-3-304.14", "**", "Wiping Cloths, Clean, Sanitized"),
    ("21-3-501.16", "**", "Proper Cold Holding Temperatures"),
    (
        "22-3-302.11",
        "**",
        "Separation, Segregation, Cross Contamination",
    ),
    ("26-2-301.12", "***", "Hand Washing: Cleaning Procedure"),
    ("30-3-101.11", "***", "Food from Approved Source"),
    ("31-3-501.14", "***", "Cooling Food: Proper Cooling Methods"),
    (
        "36-4-602.11",
        "***",
        "Food Contact Surfaces Clean & Sanitized",
    ),
];
const COMMENTS: &[&str] = &[
    "",
    "",
    "Observed on walk-through.",
    "Corrected on site, see note.",
    "Mouse droppings under prep table, near \"back door\"; remove, clean, sanitize.",
    "Cold holding at 48F, walk-in cooler\nProvide repair, recheck in 7 days.",
    "Hand sink blocked by boxes, mops, buckets.",
    "Raw chicken stored above ready-to-eat produce.\nRe-organize, discard exposed items.",
    "Floor under fryer soiled, grease build-up",
];
const PASS_RESULTS: &[&str] = &["HE_Pass", "HE_Pass", "HE_Filed", "HE_Hearing", "HE_TSOP"];
const FAIL_RESULTS: &[&str] = &["HE_Fail", "HE_Fail", "HE_FailExt", "HE_NotReq", "HE_OutBus"];

#[derive(Clone, Debug)]
struct Business {
    name: String,
    dba: String,
    owner: String,
    last: &'static str,
    first: &'static str,
    licenseno: String,
    licensecat: &'static str,
    descript: &'static str,
    licstatus: &'static str,
    address: String,
    city: &'static str,
    zip: &'static str,
    property_id: String,
    location: String,
    /// Relative weight: some places are inspected (and fail) far more often.
    weight: usize,
    /// Bias towards severe violations, 0..=3.
    severity: usize,
}

fn businesses(rng: &mut Rng, n: usize) -> Vec<Business> {
    (0..n)
        .map(|i| {
            let name = format!(
                "{} {}{}",
                rng.pick(NAME_A),
                rng.pick(NAME_B),
                rng.pick(SUFFIX)
            );
            let (city, zip) = CITY_ZIP[rng.below(CITY_ZIP.len())];
            let (licensecat, descript) = CATEGORY[rng.below(CATEGORY.len())];
            let (last, first) = (rng.pick(LAST), rng.pick(FIRST));
            let lat = 42.22 + rng.below(16_000) as f64 / 100_000.0;
            let lon = -71.19 + rng.below(20_000) as f64 / 100_000.0;
            Business {
                // Names repeat across licences (chains, common names), as in the real file.
                dba: if rng.chance(3) {
                    name.clone()
                } else {
                    String::new()
                },
                owner: format!("{} {} Holdings, LLC", first, last),
                name,
                last,
                first,
                licenseno: format!("{}", 10_000 + i * 7 + rng.below(7)),
                licensecat,
                descript,
                licstatus: if rng.chance(8) { "Inactive" } else { "Active" },
                address: format!("{} {}", 1 + rng.below(1500), rng.pick(STREET)),
                city,
                zip,
                property_id: format!("{}", 100_000 + rng.below(300_000)),
                location: format!("({lat:.5}, {lon:.5})"),
                weight: 1 + rng.below(10) * rng.below(4),
                severity: rng.below(4),
            }
        })
        .collect()
}

/// `YYYY-MM-DD HH:MM:SS` from seconds since 2008-01-01 (days of 28 to keep it simple and valid).
fn stamp(secs: u64) -> String {
    let days = secs / 86_400;
    let (y, rest) = (2008 + days / 336, days % 336);
    let (m, d) = (1 + rest / 28, 1 + rest % 28);
    let t = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        t / 3600,
        t / 60 % 60,
        t % 60
    )
}

/// Writes a CSV of `config.rows` data rows (plus the header) to `out`.
pub fn generate<W: Write>(config: &GenConfig, out: W) -> io::Result<()> {
    let mut rng = Rng(config.seed ^ 0x5EED_CAFE_F00D_0001);
    let mut w = csv::WriterBuilder::new().flexible(true).from_writer(out);
    w.write_record(HEADER)?;
    let n_business = (config.rows / 25).clamp(20, 5_000);
    let biz = businesses(&mut rng, n_business);
    let total_weight: usize = biz.iter().map(|b| b.weight).sum();
    let mut keys = HashSet::new();
    let mut recent: Vec<Vec<String>> = Vec::new();
    let kinds = [
        Malformed::BadDate,
        Malformed::MissingField,
        Malformed::UnknownLevel,
        Malformed::ColumnCount,
    ];
    let mut next_kind = 0;
    for row_no in 0..config.rows {
        // A deliberate exact duplicate of a recent violation row.
        if config.duplicate_every != 0
            && row_no % config.duplicate_every == config.duplicate_every - 1
            && !recent.is_empty()
        {
            let dup = recent[rng.below(recent.len())].clone();
            w.write_record(&dup)?;
            continue;
        }
        let mut pick = rng.below(total_weight);
        let b = biz
            .iter()
            .find(|b| {
                if pick < b.weight {
                    true
                } else {
                    pick -= b.weight;
                    false
                }
            })
            .expect("weights add up");
        let inspected = rng.next_u64() % (16 * 336 * 86_400);
        let failed = rng.below(10) < 6;
        let mut rec: Vec<String> = vec![String::new(); HEADER.len()];
        let set = |rec: &mut Vec<String>, col: &str, v: String| {
            let i = HEADER.iter().position(|h| *h == col).expect("known column");
            rec[i] = v;
        };
        // Some text comes with stray spaces, as typed by hand.
        let name = if rng.chance(9) {
            format!("  {} ", b.name)
        } else {
            b.name.clone()
        };
        set(&mut rec, "businessname", name);
        set(&mut rec, "dbaname", b.dba.clone());
        set(&mut rec, "legalowner", b.owner.clone());
        set(&mut rec, "namelast", b.last.to_string());
        set(&mut rec, "namefirst", b.first.to_string());
        set(&mut rec, "licenseno", b.licenseno.clone());
        set(&mut rec, "issdttm", stamp(inspected % (336 * 86_400)));
        set(
            &mut rec,
            "expdttm",
            stamp(inspected % (336 * 86_400) + 17 * 336 * 86_400),
        );
        set(&mut rec, "licstatus", b.licstatus.to_string());
        set(&mut rec, "licensecat", b.licensecat.to_string());
        set(&mut rec, "descript", b.descript.to_string());
        set(&mut rec, "resultdttm", stamp(inspected));
        set(&mut rec, "address", b.address.clone());
        set(&mut rec, "city", b.city.to_string());
        set(&mut rec, "state", "MA".to_string());
        set(&mut rec, "zip", b.zip.to_string());
        set(&mut rec, "property_id", b.property_id.clone());
        set(&mut rec, "location", b.location.clone());
        if failed {
            set(&mut rec, "result", rng.pick(FAIL_RESULTS).to_string());
            // Severity-biased choice of violation: a higher bias shifts towards `***`.
            let base = rng.below(VIOLATIONS.len());
            let shift = rng.below(b.severity * 3 + 1);
            let (code, level, desc) = VIOLATIONS[(base + shift).min(VIOLATIONS.len() - 1)];
            // The natural key (licence, violation time, code) is unique outside duplicates.
            let mut when = inspected + rng.below(3) as u64 * 60;
            while !keys.insert((b.licenseno.clone(), when, code)) {
                when += 1;
            }
            set(&mut rec, "violation", code.to_string());
            set(&mut rec, "viol_level", level.to_string());
            set(&mut rec, "violdesc", desc.to_string());
            set(&mut rec, "violdttm", stamp(when));
            let fixed = rng.chance(2);
            set(
                &mut rec,
                "violstatus",
                if fixed { "Pass" } else { "Fail" }.to_string(),
            );
            if fixed {
                set(&mut rec, "statusdate", stamp(when + 7 * 86_400));
            }
            set(&mut rec, "comments", rng.pick(COMMENTS).to_string());
        } else {
            set(&mut rec, "result", rng.pick(PASS_RESULTS).to_string());
        }
        if config.malformed_every != 0 && row_no % config.malformed_every == 5 {
            let kind = kinds[next_kind % kinds.len()];
            next_kind += 1;
            corrupt(&mut rng, &mut rec, kind, failed);
        } else if failed {
            recent.push(rec.clone());
            if recent.len() > 64 {
                recent.remove(0);
            }
        }
        w.write_record(&rec)?;
    }
    w.flush()
}

fn corrupt(rng: &mut Rng, rec: &mut Vec<String>, kind: Malformed, failed: bool) {
    let col = |name: &str| {
        HEADER
            .iter()
            .position(|h| *h == name)
            .expect("known column")
    };
    match kind {
        Malformed::BadDate => {
            let bad = [
                "2015-13-45 25:61:00",
                "last tuesday",
                "2019-02-30 10:00:00",
                "20190304",
            ];
            let field = if failed { "violdttm" } else { "resultdttm" };
            rec[col(field)] = rng.pick(&bad).to_string();
        }
        Malformed::MissingField => {
            let field = if failed && rng.chance(3) {
                "violdttm"
            } else if rng.chance(2) {
                "businessname"
            } else {
                "licenseno"
            };
            rec[col(field)] = String::new();
        }
        Malformed::UnknownLevel => {
            if !failed {
                // Give the passing row a violation so that its level matters.
                let (code, _, desc) = VIOLATIONS[rng.below(VIOLATIONS.len())];
                rec[col("violation")] = code.to_string();
                rec[col("violdesc")] = desc.to_string();
                rec[col("violdttm")] = rec[col("resultdttm")].clone();
            }
            rec[col("viol_level")] = rng.pick(&["****", "?", "high", "4"]).to_string();
        }
        Malformed::ColumnCount => {
            if rng.chance(2) {
                rec.truncate(rec.len() - 1 - rng.below(3));
            } else {
                rec.push("extra".to_string());
            }
        }
    }
}
