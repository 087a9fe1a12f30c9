//! (being written) A dedupe window over `SET NX PX`.

/// (being written)
#[derive(Debug)]
pub struct DedupeWindow;

/// (being written)
#[derive(Debug)]
pub struct Claim;
