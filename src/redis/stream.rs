//! (being written) A consumer-group reader of a Redis stream.

/// (being written)
#[derive(Debug)]
pub struct StreamSource;

/// (being written)
#[derive(Debug)]
pub struct Message;

/// (being written)
#[derive(Debug)]
pub struct Ack;
