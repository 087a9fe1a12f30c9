//! What a [`StreamSource`](super::StreamSource) hands out: a [`Message`] (an [`Entry`] of the
//! stream and its [`Ack`]), and the [`FieldError`] of a field read as text.

use std::fmt;
use std::str::Utf8Error;
use std::sync::Arc;

use super::shared::Shared;

/// An entry's fields and values, in order.
pub(super) type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// One entry of the stream, as Redis stores it: its id, its fields (bytes, in the order they
/// were added) and how many times the group has delivered it.
#[derive(Clone, PartialEq, Eq)]
pub struct Entry {
    pub(super) id: Arc<str>,
    pub(super) fields: Fields,
    pub(super) deliveries: u32,
}

impl Entry {
    /// The entry's id, `"<milliseconds>-<sequence>"`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// How many times the group has delivered this entry, this delivery included: 1 for a
    /// new entry, more for one claimed from a consumer that did not acknowledge it.
    pub fn deliveries(&self) -> u32 {
        self.deliveries
    }

    /// The fields and values, in the order they were added.
    pub fn fields(&self) -> impl ExactSizeIterator<Item = (&[u8], &[u8])> + '_ {
        self.fields
            .iter()
            .map(|(f, v)| (f.as_slice(), v.as_slice()))
    }

    /// The value of `field` (the first, if the entry repeats it), as bytes.
    pub fn get(&self, field: impl AsRef<[u8]>) -> Option<&[u8]> {
        let field = field.as_ref();
        self.fields
            .iter()
            .find(|(f, _)| f.as_slice() == field)
            .map(|(_, v)| v.as_slice())
    }

    /// The value of `field` as text.
    ///
    /// # Errors
    ///
    /// [`FieldError::Missing`] if the entry has no such field, [`FieldError::NotUtf8`] if its
    /// value is not UTF-8 (the bytes are still there: [`get`](Self::get)).
    pub fn text(&self, field: &str) -> Result<&str, FieldError> {
        let value = self.get(field).ok_or_else(|| FieldError::Missing {
            field: field.to_owned(),
        })?;
        std::str::from_utf8(value).map_err(|error| FieldError::NotUtf8 {
            field: field.to_owned(),
            error,
        })
    }
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Shown<'a>(&'a [(Vec<u8>, Vec<u8>)]);
        impl fmt::Debug for Shown<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_map()
                    .entries(
                        self.0
                            .iter()
                            .map(|(k, v)| (String::from_utf8_lossy(k), String::from_utf8_lossy(v))),
                    )
                    .finish()
            }
        }
        f.debug_struct("Entry")
            .field("id", &self.id)
            .field("deliveries", &self.deliveries)
            .field("fields", &Shown(&self.fields))
            .finish()
    }
}

/// An entry handed out by a [`StreamSource`](super::StreamSource), with the handle that
/// acknowledges it.
///
/// [`ack`](Self::ack) once the entry's work is done: the id joins the source's next `XACK`
/// batch. A message dropped without `ack` (the work failed, or was cancelled) stays pending in
/// the group, and is delivered again (to this consumer or another) once it has been idle for
/// the source's `claim_idle`. To carry the acknowledgement along a pipeline apart from the
/// payload, split the two with [`into_parts`](Self::into_parts).
#[derive(Debug)]
pub struct Message {
    pub(super) entry: Entry,
    pub(super) ack: Ack,
}

impl Message {
    /// The entry's id, `"<milliseconds>-<sequence>"`.
    pub fn id(&self) -> &str {
        self.entry.id()
    }

    /// How many times the group has delivered this entry, this delivery included.
    pub fn deliveries(&self) -> u32 {
        self.entry.deliveries()
    }

    /// The fields and values, in the order they were added.
    pub fn fields(&self) -> impl ExactSizeIterator<Item = (&[u8], &[u8])> + '_ {
        self.entry.fields()
    }

    /// The value of `field`, as bytes.
    pub fn get(&self, field: impl AsRef<[u8]>) -> Option<&[u8]> {
        self.entry.get(field)
    }

    /// The value of `field` as text.
    ///
    /// # Errors
    ///
    /// [`FieldError::Missing`] if the entry has no such field, [`FieldError::NotUtf8`] if its
    /// value is not UTF-8.
    pub fn text(&self, field: &str) -> Result<&str, FieldError> {
        self.entry.text(field)
    }

    /// The entry.
    pub fn entry(&self) -> &Entry {
        &self.entry
    }

    /// Acknowledges the entry: its id joins the source's next `XACK` batch.
    pub fn ack(self) {
        self.ack.ack();
    }

    /// The entry and its acknowledgement, apart: the [`Ack`] can travel down a pipeline on its
    /// own (or be dropped, leaving the entry pending).
    pub fn into_parts(self) -> (Entry, Ack) {
        (self.entry, self.ack)
    }
}

/// The acknowledgement of one entry, handed out inside a [`Message`].
///
/// [`ack`](Self::ack) sends it (batched with others); dropping it without `ack` leaves the
/// entry pending, to be delivered again after the source's `claim_idle`. Acknowledgements made
/// after the source has stopped (dropped, or drained) are not sent: those entries stay
/// pending too.
pub struct Ack {
    /// `None` once settled.
    pub(super) id: Option<Arc<str>>,
    pub(super) shared: Arc<Shared>,
}

impl Ack {
    /// The id of the entry it acknowledges.
    pub fn id(&self) -> &str {
        self.id.as_deref().unwrap_or_default()
    }

    /// Acknowledges the entry: its id joins the source's next `XACK` batch, sent when the
    /// batch is full or its wait has passed (see
    /// [`StreamSourceBuilder::ack_batch`](super::StreamSourceBuilder::ack_batch)).
    pub fn ack(mut self) {
        if let Some(id) = self.id.take() {
            self.shared.settle(id, true);
        }
    }
}

impl Drop for Ack {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.shared.settle(id, false);
        }
    }
}

impl fmt::Debug for Ack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ack").field("id", &self.id()).finish()
    }
}

/// A field of an [`Entry`] that could not be read as text.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FieldError {
    /// The entry has no such field.
    Missing {
        /// The field asked for.
        field: String,
    },
    /// The field's value is not UTF-8.
    NotUtf8 {
        /// The field asked for.
        field: String,
        /// Where the value stops being UTF-8.
        error: Utf8Error,
    },
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FieldError::Missing { field } => write!(f, "the entry has no field `{field}`"),
            FieldError::NotUtf8 { field, .. } => write!(f, "field `{field}` is not UTF-8"),
        }
    }
}

impl std::error::Error for FieldError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            FieldError::Missing { .. } => None,
            FieldError::NotUtf8 { error, .. } => Some(error),
        }
    }
}
