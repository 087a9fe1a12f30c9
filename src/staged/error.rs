//! Errors of staged pipelines.

use std::fmt;

use super::StateMachine;

/// Why a request of a staged pipeline did not finish.
#[non_exhaustive]
pub enum StageError<M: StateMachine> {
    /// A stage returned an error.
    Failed {
        /// The stage that failed.
        stage: M::Stage,
        /// Its error.
        error: M::Error,
    },
    /// In DAG mode, the machine routed a request back to a stage it had already visited.
    Cycle {
        /// The stages visited in order, ending with the stage it tried to revisit.
        path: Vec<M::Stage>,
    },
    /// A stage panicked: in [`run`](StateMachine::run), while it made the stage's future or
    /// while the future ran. The panic stays inside this request; the pipeline keeps serving.
    Panicked {
        /// The stage that panicked.
        stage: M::Stage,
        /// The panic's message, if it had a string payload.
        message: String,
    },
    /// The machine's [`start`](StateMachine::start) panicked for this request, so it never
    /// reached a stage (and no stage's figures count it). The panic stays inside this request;
    /// the pipeline keeps serving.
    StartPanicked {
        /// The panic's message, if it had a string payload.
        message: String,
    },
    /// The group's deadline ([`GroupBuilder::deadline`](super::GroupBuilder::deadline)) passed
    /// before its results were all yielded: the group's last item. The group was cancelled:
    /// its unfinished requests were abandoned and later submissions are refused.
    DeadlineExceeded {
        /// Requests submitted to the group that were left without a result.
        abandoned: u64,
    },
    /// The pipeline's drain timed out ([`Pipeline::drain_timeout`](super::Pipeline::drain_timeout))
    /// while the group was still open: the group's last item. The group was cancelled as for
    /// [`DeadlineExceeded`](Self::DeadlineExceeded).
    DrainTimedOut {
        /// Requests submitted to the group that were left without a result.
        abandoned: u64,
    },
    /// The pipeline began to [drain](super::Pipeline::drain) before a group given its requests
    /// up front ([`GroupBuilder::submit_all`](super::GroupBuilder::submit_all)) had pulled
    /// them all: the group's last item, after the results of the requests it had pulled. (A
    /// group fed by a [`Submitter`](super::Submitter) learns this from its refused
    /// submissions instead.)
    Drained {
        /// The group's requests left without a result.
        abandoned: u64,
    },
}

impl<M: StateMachine> StageError<M> {
    /// The stage where the request stopped (for `Cycle`, the stage it tried to revisit), or
    /// `None` for `StartPanicked` (the request never reached a stage) and for the errors that
    /// end a whole group (`DeadlineExceeded`, `DrainTimedOut`, `Drained`).
    pub fn stage(&self) -> Option<M::Stage> {
        match self {
            Self::Failed { stage, .. } | Self::Panicked { stage, .. } => Some(*stage),
            Self::Cycle { path } => path.last().copied(),
            Self::StartPanicked { .. }
            | Self::DeadlineExceeded { .. }
            | Self::DrainTimedOut { .. }
            | Self::Drained { .. } => None,
        }
    }

    /// For the errors that end a whole group (`DeadlineExceeded`, `DrainTimedOut`,
    /// `Drained`), the requests submitted to it that were left without a result; `None` for the
    /// errors of one request.
    pub fn abandoned(&self) -> Option<u64> {
        match self {
            Self::DeadlineExceeded { abandoned }
            | Self::DrainTimedOut { abandoned }
            | Self::Drained { abandoned } => Some(*abandoned),
            _ => None,
        }
    }
}

impl<M: StateMachine> fmt::Debug for StageError<M>
where
    M::Error: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Failed { stage, error } => f
                .debug_struct("Failed")
                .field("stage", stage)
                .field("error", error)
                .finish(),
            Self::Cycle { path } => f.debug_struct("Cycle").field("path", path).finish(),
            Self::Panicked { stage, message } => f
                .debug_struct("Panicked")
                .field("stage", stage)
                .field("message", message)
                .finish(),
            Self::StartPanicked { message } => f
                .debug_struct("StartPanicked")
                .field("message", message)
                .finish(),
            Self::DeadlineExceeded { abandoned } => f
                .debug_struct("DeadlineExceeded")
                .field("abandoned", abandoned)
                .finish(),
            Self::DrainTimedOut { abandoned } => f
                .debug_struct("DrainTimedOut")
                .field("abandoned", abandoned)
                .finish(),
            Self::Drained { abandoned } => f
                .debug_struct("Drained")
                .field("abandoned", abandoned)
                .finish(),
        }
    }
}

impl<M: StateMachine> fmt::Display for StageError<M>
where
    M::Error: fmt::Display,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Failed { stage, error } => write!(f, "stage {stage:?} failed: {error}"),
            Self::Cycle { path } => write!(f, "stage cycle: {path:?}"),
            Self::Panicked { stage, message } => write!(f, "stage {stage:?} panicked: {message}"),
            Self::StartPanicked { message } => write!(f, "start panicked: {message}"),
            Self::DeadlineExceeded { abandoned } => {
                write!(
                    f,
                    "the group's deadline passed: {abandoned} requests abandoned"
                )
            }
            Self::DrainTimedOut { abandoned } => write!(
                f,
                "the pipeline's drain timed out: {abandoned} requests abandoned"
            ),
            Self::Drained { abandoned } => write!(
                f,
                "the pipeline is draining: {abandoned} requests abandoned"
            ),
        }
    }
}

impl<M: StateMachine> std::error::Error for StageError<M>
where
    M::Error: std::error::Error + 'static,
{
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        // `Display` already shows the stage's error, so the chain goes on with *its* source.
        match self {
            Self::Failed { error, .. } => error.source(),
            _ => None,
        }
    }
}

/// A submission refused because its group is closed (closed by the submitter, cancelled after
/// an error, or its results stream was dropped). The data comes back in field `0`.
#[derive(Clone, PartialEq, Eq)]
pub struct GroupClosed<T>(pub T);

impl<T> GroupClosed<T> {
    /// The refused data.
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> fmt::Debug for GroupClosed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GroupClosed(..)")
    }
}

impl<T> fmt::Display for GroupClosed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the request group is closed")
    }
}

impl<T> std::error::Error for GroupClosed<T> {}
