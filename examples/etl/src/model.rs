//! Parse/validate, transform and route: plain functions over one CSV record each.
//!
//! * [`validate`] checks the record (column count, required fields, dates, level) and parses
//!   what it checked, or says why the row is rejected ([`Reject`]).
//! * [`transform`] builds the typed row: [`Timestamp`]s, level 1–3, trimmed text.
//! * [`route`] sends rows with a violation to the loader and counts the rest as skipped.

use std::fmt;

use csv::StringRecord;

/// The real file's header, in its order.
pub const HEADER: [&str; 26] = [
    "businessname",
    "dbaname",
    "legalowner",
    "namelast",
    "namefirst",
    "licenseno",
    "issdttm",
    "expdttm",
    "licstatus",
    "licensecat",
    "descript",
    "result",
    "resultdttm",
    "violation",
    "viol_level",
    "violdesc",
    "violdttm",
    "violstatus",
    "statusdate",
    "comments",
    "address",
    "city",
    "state",
    "zip",
    "property_id",
    "location",
];

/// Index of a column in [`HEADER`] (and so in [`Columns`]).
#[derive(Clone, Copy, Debug)]
#[allow(missing_docs)]
pub enum Col {
    BusinessName = 0,
    DbaName,
    LegalOwner,
    NameLast,
    NameFirst,
    LicenseNo,
    IssDttm,
    ExpDttm,
    LicStatus,
    LicenseCat,
    Descript,
    Result,
    ResultDttm,
    Violation,
    ViolLevel,
    ViolDesc,
    ViolDttm,
    ViolStatus,
    StatusDate,
    Comments,
    Address,
    City,
    State,
    Zip,
    PropertyId,
    Location,
}

/// The date columns, each checked when not empty.
const DATE_COLS: [Col; 5] = [
    Col::IssDttm,
    Col::ExpDttm,
    Col::ResultDttm,
    Col::ViolDttm,
    Col::StatusDate,
];

/// Other names of a column, as older or newer exports of the real file spell them: the 2021
/// file (and the Go ETLs written for it) calls the level column `viollevel`.
const ALIASES: &[(Col, &str)] = &[(Col::ViolLevel, "viollevel")];

/// Columns the job never reads: a file without them loads all the same.
const UNUSED: [Col; 3] = [Col::NameLast, Col::NameFirst, Col::LicStatus];

/// A column absent from the header.
const ABSENT: usize = usize::MAX;

/// Where each column of [`HEADER`] sits in the file: columns are found by name, in any order,
/// among any others.
#[derive(Clone, Debug)]
pub struct Columns {
    at: [usize; 26],
    width: usize,
}

impl Columns {
    /// Maps the file's header onto [`HEADER`]; names are matched trimmed (a byte-order mark
    /// too) and case-insensitively, and a column may go by one of its aliases (`viollevel` for `viol_level`).
    ///
    /// Fails naming every column the job needs that the header lacks.
    pub fn from_header(header: &StringRecord) -> Result<Self, String> {
        let names: Vec<String> = header
            .iter()
            .map(|h| h.trim().trim_start_matches('\u{feff}').to_ascii_lowercase())
            .collect();
        let find = |name: &str| names.iter().position(|h| h == name);
        let mut at = [ABSENT; 26];
        let mut missing = Vec::new();
        for (i, name) in HEADER.iter().enumerate() {
            let aliases = ALIASES.iter().filter(|(c, _)| *c as usize == i);
            match find(name).or_else(|| aliases.clone().find_map(|(_, a)| find(a))) {
                Some(p) => at[i] = p,
                None if UNUSED.iter().any(|c| *c as usize == i) => {}
                None => missing.push(
                    std::iter::once(format!("`{name}`"))
                        .chain(aliases.map(|(_, a)| format!("`{a}`")))
                        .collect::<Vec<_>>()
                        .join(" or "),
                ),
            }
        }
        if !missing.is_empty() {
            let s = if missing.len() == 1 { "" } else { "s" };
            return Err(format!(
                "the header has no column{s} {} (it has {} columns: {})",
                missing.join(", "),
                names.len(),
                names.join(",")
            ));
        }
        Ok(Columns {
            at,
            width: header.len(),
        })
    }

    /// The number of fields of the header (every record must have as many).
    pub fn width(&self) -> usize {
        self.width
    }

    fn get<'r>(&self, record: &'r StringRecord, col: Col) -> &'r str {
        record.get(self.at[col as usize]).unwrap_or("")
    }
}

/// Why a row is rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectKind {
    /// The record has another number of fields than the header.
    ColumnCount,
    /// A required field is empty.
    MissingField,
    /// A date field does not parse.
    BadDate,
    /// `viol_level` is not `*`, `**` or `***`.
    UnknownLevel,
}

impl RejectKind {
    /// The name stored in the `rejects` table's `kind` column.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectKind::ColumnCount => "column_count",
            RejectKind::MissingField => "missing_field",
            RejectKind::BadDate => "bad_date",
            RejectKind::UnknownLevel => "unknown_level",
        }
    }
}

/// A rejected row: its line in the file (where the record starts), why, and the raw text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reject {
    /// The line the record starts on (the header is line 1).
    pub line: u64,
    /// The kind of problem.
    pub kind: RejectKind,
    /// A readable reason, naming the field and value.
    pub reason: String,
    /// The raw fields, joined with `,` (for the rejects table).
    pub raw: String,
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "line {}: {}: {}",
            self.line,
            self.kind.as_str(),
            self.reason
        )
    }
}

/// One CSV record with the line it starts on.
#[derive(Clone, Debug)]
pub struct RawRow {
    /// The line the record starts on (the header is line 1).
    pub line: u64,
    /// The fields as read.
    pub record: StringRecord,
}

/// A date and time without zone, as the file writes it (`YYYY-MM-DD[ HH:MM:SS[.fff]]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    /// Year.
    pub year: u16,
    /// Month, 1–12.
    pub month: u8,
    /// Day, 1–31 (valid for the month).
    pub day: u8,
    /// Hour, 0–23.
    pub hour: u8,
    /// Minute, 0–59.
    pub minute: u8,
    /// Second, 0–59.
    pub second: u8,
}

impl Timestamp {
    /// Parses the forms the real file and its exports use:
    ///
    /// * `YYYY-MM-DD`, `YYYY-MM-DD HH:MM:SS` or `YYYY-MM-DDTHH:MM:SS`, with optional fractional
    ///   seconds (dropped) and an optional zone, `Z`, `+HH`, `+HH:MM` or `+HHMM` (dropped: the
    ///   times are Boston's wall clock, stored as written);
    /// * `MM/DD/YYYY` or `MM/DD/YYYY HH:MM:SS`, optionally followed by `AM`/`PM` (older
    ///   exports of the open-data portal).
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        let b = s.as_bytes();
        let num = |r: std::ops::Range<usize>| -> Option<u32> {
            let part = b.get(r)?;
            if part.iter().all(u8::is_ascii_digit) {
                std::str::from_utf8(part).ok()?.parse().ok()
            } else {
                None
            }
        };
        // The date, and where the rest begins.
        let (year, month, day, rest) = if b.len() >= 10 && b[4] == b'-' && b[7] == b'-' {
            (num(0..4)?, num(5..7)?, num(8..10)?, 10)
        } else if b.len() >= 10 && b[2] == b'/' && b[5] == b'/' {
            (num(6..10)?, num(0..2)?, num(3..5)?, 10)
        } else {
            return None;
        };
        let us = b[4] != b'-';
        let (mut hour, mut minute, mut second) = (0, 0, 0);
        if b.len() > rest {
            let t = rest + 1;
            if !(b[rest] == b' ' || (!us && b[rest] == b'T'))
                || b.len() < t + 8
                || b[t + 2] != b':'
                || b[t + 5] != b':'
            {
                return None;
            }
            (hour, minute, second) = (num(t..t + 2)?, num(t + 3..t + 5)?, num(t + 6..t + 8)?);
            let mut i = t + 8;
            if b.get(i) == Some(&b'.') {
                i += 1;
                let digits = b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
                if digits == 0 {
                    return None;
                }
                i += digits;
            }
            let tail = &s[i..];
            if us {
                // 12-hour clock when AM/PM follows.
                match tail.trim_start() {
                    "" => {}
                    m @ ("AM" | "PM" | "am" | "pm") if tail.len() > m.len() => {
                        if !(1..=12).contains(&hour) {
                            return None;
                        }
                        hour %= 12;
                        if m.eq_ignore_ascii_case("PM") {
                            hour += 12;
                        }
                    }
                    _ => return None,
                }
            } else if !(tail.is_empty() || tail == "Z" || is_offset(tail)) {
                return None;
            }
        }
        let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
        let days_in_month = match month {
            1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
            4 | 6 | 9 | 11 => 30,
            2 if leap => 29,
            2 => 28,
            _ => return None,
        };
        if !(1..=9999).contains(&year)
            || day == 0
            || day > days_in_month
            || hour > 23
            || minute > 59
            || second > 59
        {
            return None;
        }
        Some(Timestamp {
            year: year as u16,
            month: month as u8,
            day: day as u8,
            hour: hour as u8,
            minute: minute as u8,
            second: second as u8,
        })
    }
}

/// `+HH`, `+HH:MM` or `+HHMM` (or with `-`).
fn is_offset(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    matches!(b.first(), Some(b'+' | b'-'))
        && match b.len() {
            3 => digits(1..3),
            5 => digits(1..5),
            6 => digits(1..3) && b[3] == b':' && digits(4..6),
            _ => false,
        }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }
}

/// A record that passed [`validate`]: the record plus what was parsed while checking it.
#[derive(Clone, Debug)]
pub struct Checked {
    /// The line the record starts on.
    pub line: u64,
    /// The record.
    pub record: StringRecord,
    /// `resultdttm`, parsed.
    pub result_at: Option<Timestamp>,
    /// `violdttm`, parsed.
    pub viol_at: Option<Timestamp>,
    /// `statusdate`, parsed.
    pub status_at: Option<Timestamp>,
    /// 1–3 for `*`–`***`; `None` when the row has no violation.
    pub level: Option<u8>,
}

/// Checks one record and parses what it checks; the first problem found rejects the row.
///
/// Order of checks: column count, required fields (`businessname`, `licenseno`; with a
/// violation also `viol_level` and `violdttm`), dates (every non-empty date column), level.
pub fn validate(row: RawRow, cols: &Columns) -> Result<Checked, Reject> {
    let RawRow { line, record } = row;
    let reject = |kind, reason: String, record: &StringRecord| Reject {
        line,
        kind,
        reason,
        raw: record.iter().collect::<Vec<_>>().join(","),
    };
    if record.len() != cols.width {
        let reason = format!("{} fields, expected {}", record.len(), cols.width);
        return Err(reject(RejectKind::ColumnCount, reason, &record));
    }
    let get = |c| cols.get(&record, c).trim();
    let has_violation = !get(Col::Violation).is_empty();
    let mut required = vec![Col::BusinessName, Col::LicenseNo];
    if has_violation {
        required.extend([Col::ViolLevel, Col::ViolDttm]);
    }
    for c in required {
        if get(c).is_empty() {
            let reason = format!("{} is empty", HEADER[c as usize]);
            return Err(reject(RejectKind::MissingField, reason, &record));
        }
    }
    let mut parsed = [None; 5];
    for (slot, c) in parsed.iter_mut().zip(DATE_COLS) {
        let v = get(c);
        if !v.is_empty() {
            *slot = Some(Timestamp::parse(v).ok_or_else(|| {
                let reason = format!("{} is not a date: {v:?}", HEADER[c as usize]);
                reject(RejectKind::BadDate, reason, &record)
            })?);
        }
    }
    let level = match get(Col::ViolLevel) {
        "" => None,
        "*" => Some(1),
        "**" => Some(2),
        "***" => Some(3),
        other => {
            let reason = format!("viol_level {other:?} is not *, ** or ***");
            return Err(reject(RejectKind::UnknownLevel, reason, &record));
        }
    };
    Ok(Checked {
        line,
        result_at: parsed[2],
        viol_at: parsed[3],
        status_at: parsed[4],
        level: if has_violation { level } else { None },
        record,
    })
}

/// One inspection row, typed and trimmed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inspection {
    /// The line the record starts on.
    pub line: u64,
    /// Business name.
    pub businessname: String,
    /// Doing-business-as name.
    pub dbaname: String,
    /// Legal owner.
    pub legalowner: String,
    /// Licence number (part of the natural key).
    pub licenseno: String,
    /// Licence category code (`FS`, `RF`, ...).
    pub licensecat: String,
    /// Licence category description.
    pub descript: String,
    /// Inspection result (`HE_Pass`, `HE_Fail`, ...).
    pub result: String,
    /// When the inspection was resulted.
    pub resultdttm: Option<Timestamp>,
    /// Violation code; empty when the inspection found none.
    pub violation: String,
    /// Violation level 1–3 (`*`–`***`), when there is a violation.
    pub level: Option<u8>,
    /// Violation description.
    pub violdesc: String,
    /// When the violation was recorded (part of the natural key).
    pub violdttm: Option<Timestamp>,
    /// Violation status (`Pass`, `Fail`).
    pub violstatus: String,
    /// When the status was set.
    pub statusdate: Option<Timestamp>,
    /// Inspector's comments (may hold commas and newlines).
    pub comments: String,
    /// Street address.
    pub address: String,
    /// City.
    pub city: String,
    /// State.
    pub state: String,
    /// ZIP code.
    pub zip: String,
    /// Property id.
    pub property_id: String,
    /// `(lat, lon)` as written in the file.
    pub location: String,
}

/// Builds the typed, trimmed row from a checked record.
pub fn transform(c: Checked, cols: &Columns) -> Inspection {
    let cols_get = |i: Col| -> String { cols.get(&c.record, i).trim().to_string() };
    Inspection {
        line: c.line,
        businessname: cols_get(Col::BusinessName),
        dbaname: cols_get(Col::DbaName),
        legalowner: cols_get(Col::LegalOwner),
        licenseno: cols_get(Col::LicenseNo),
        licensecat: cols_get(Col::LicenseCat),
        descript: cols_get(Col::Descript),
        result: cols_get(Col::Result),
        resultdttm: c.result_at,
        violation: cols_get(Col::Violation),
        level: c.level,
        violdesc: cols_get(Col::ViolDesc),
        violdttm: c.viol_at,
        violstatus: cols_get(Col::ViolStatus),
        statusdate: c.status_at,
        comments: cols_get(Col::Comments),
        address: cols_get(Col::Address),
        city: cols_get(Col::City),
        state: cols_get(Col::State),
        zip: cols_get(Col::Zip),
        property_id: cols_get(Col::PropertyId),
        location: cols_get(Col::Location),
    }
}

/// Where a row goes after [`route`].
// Most rows are `Load`: boxing it would only add an allocation per row.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Routed {
    /// A violation row, to load.
    Load(Inspection),
    /// An inspection without a violation: counted, not loaded.
    Skip,
}

/// Rows with a violation go to the loader; the rest are counted as skipped.
pub fn route(row: Inspection) -> Routed {
    if row.violation.is_empty() {
        Routed::Skip
    } else {
        Routed::Load(row)
    }
}

/// What one CSV record becomes: a row to load, a skipped row, or a reject.
// Most rows are `Load`: boxing it would only add an allocation per row.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A violation row, to load.
    Load(Inspection),
    /// A row without a violation.
    Skip,
    /// A malformed row.
    Reject(Reject),
}

/// The three steps in one call: what a sequential loader does per record.
pub fn process(row: RawRow, cols: &Columns) -> Outcome {
    match validate(row, cols) {
        Ok(c) => match route(transform(c, cols)) {
            Routed::Load(r) => Outcome::Load(r),
            Routed::Skip => Outcome::Skip,
        },
        Err(r) => Outcome::Reject(r),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> StringRecord {
        StringRecord::from(HEADER.to_vec())
    }

    fn good() -> Vec<String> {
        let mut r = vec![String::new(); 26];
        r[Col::BusinessName as usize] = "  Golden Pizza, Inc. ".into();
        r[Col::LicenseNo as usize] = "12345".into();
        r[Col::ResultDttm as usize] = "2015-03-04 10:11:12".into();
        r[Col::Violation as usize] = "36-4-602.11".into();
        r[Col::ViolLevel as usize] = "***".into();
        r[Col::ViolDttm as usize] = "2015-03-04T10:11:12.000".into();
        r[Col::Comments as usize] = "dirty,\nvery".into();
        r
    }

    fn run(fields: Vec<String>) -> Outcome {
        let cols = Columns::from_header(&header()).unwrap();
        process(
            RawRow {
                line: 7,
                record: StringRecord::from(fields),
            },
            &cols,
        )
    }

    fn kind(o: Outcome) -> RejectKind {
        match o {
            Outcome::Reject(r) => {
                assert_eq!(r.line, 7);
                r.kind
            }
            other => panic!("expected a reject, got {other:?}"),
        }
    }

    #[test]
    fn timestamps() {
        let t = Timestamp::parse("2016-02-29 23:59:59").unwrap();
        assert_eq!(t.to_string(), "2016-02-29 23:59:59");
        assert_eq!(
            Timestamp::parse("2016-02-29").unwrap().to_string(),
            "2016-02-29 00:00:00"
        );
        assert!(Timestamp::parse("2016-02-29T01:02:03.123Z").is_some());
        for (form, want) in [
            ("2016-02-29 23:59:59+00", "2016-02-29 23:59:59"),
            ("2016-02-29T23:59:59-05:00", "2016-02-29 23:59:59"),
            ("02/29/2016 11:59:59 PM", "2016-02-29 23:59:59"),
            ("02/29/2016 12:00:01 AM", "2016-02-29 00:00:01"),
            ("02/29/2016 13:00:00", "2016-02-29 13:00:00"),
            ("02/29/2016", "2016-02-29 00:00:00"),
        ] {
            assert_eq!(Timestamp::parse(form).unwrap().to_string(), want, "{form}");
        }
        for bad in [
            "2015-02-29 00:00:00",
            "2015-13-01 00:00:00",
            "2015-01-01 24:00:00",
            "20150101",
            "last tuesday",
            "2015-01-01 10:00",
            "2015-01-01 10:00:00.x",
            "2015-01-01 10:00:00+5",
            "02/29/2015 10:00:00",
            "02/01/2015 13:00:00 PM",
            "02/01/2015T10:00:00",
            "2015-01-01 10:00:00 PM",
        ] {
            assert_eq!(Timestamp::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn good_row_is_typed_and_trimmed() {
        match run(good()) {
            Outcome::Load(r) => {
                assert_eq!(r.line, 7);
                assert_eq!(r.businessname, "Golden Pizza, Inc.");
                assert_eq!(r.level, Some(3));
                assert_eq!(r.violdttm.unwrap().to_string(), "2015-03-04 10:11:12");
                assert_eq!(r.comments, "dirty,\nvery");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn row_without_violation_is_skipped() {
        let mut r = good();
        for c in [Col::Violation, Col::ViolLevel, Col::ViolDttm] {
            r[c as usize].clear();
        }
        assert_eq!(run(r), Outcome::Skip);
    }

    #[test]
    fn each_malformed_kind() {
        let mut short = good();
        short.pop();
        assert_eq!(kind(run(short)), RejectKind::ColumnCount);
        for c in [
            Col::BusinessName,
            Col::LicenseNo,
            Col::ViolDttm,
            Col::ViolLevel,
        ] {
            let mut r = good();
            r[c as usize] = "  ".into();
            assert_eq!(kind(run(r)), RejectKind::MissingField, "{c:?}");
        }
        let mut r = good();
        r[Col::StatusDate as usize] = "2019-02-30 10:00:00".into();
        assert_eq!(kind(run(r)), RejectKind::BadDate);
        let mut r = good();
        r[Col::ViolLevel as usize] = "****".into();
        assert_eq!(kind(run(r)), RejectKind::UnknownLevel);
    }

    #[test]
    fn header_in_another_order() {
        let mut names: Vec<&str> = HEADER.to_vec();
        names.reverse();
        let cols = Columns::from_header(&StringRecord::from(names)).unwrap();
        assert_eq!(cols.at[0], 25);
        let missing = StringRecord::from(vec!["businessname"]);
        assert!(
            Columns::from_header(&missing)
                .unwrap_err()
                .contains("dbaname")
        );
    }

    #[test]
    fn level_column_by_either_name_and_unused_columns_optional() {
        let names: Vec<&str> = HEADER
            .iter()
            .map(|h| if *h == "viol_level" { "VIOLLEVEL" } else { h })
            .filter(|h| !["namelast", "namefirst", "licstatus"].contains(h))
            .collect();
        let cols = Columns::from_header(&StringRecord::from(names.clone())).unwrap();
        assert_eq!(cols.width(), 23);
        assert_eq!(cols.at[Col::ViolLevel as usize], 11);
        let without: Vec<&str> = names
            .into_iter()
            .filter(|h| *h != "VIOLLEVEL" && *h != "violdttm")
            .collect();
        let err = Columns::from_header(&StringRecord::from(without)).unwrap_err();
        assert!(
            err.starts_with("the header has no columns `viol_level` or `viollevel`, `violdttm`"),
            "{err}"
        );
    }
}
