//! The harness's one error type, [`Error`], and its [`Result`].
//!
//! A variant says what went wrong and what the caller does next: most end
//! the run with an "unknown" verdict (the caller prints them and exits 2);
//! [`Error::GroupsUnimplemented`] alone means "go on without groups".

use std::process::ExitStatus;
use std::time::Duration;

/// What went wrong in the harness: starting and controlling processes,
/// setting up the workload, reading a history, writing a run's files.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No usable `rim` binary: the message says where it looked and how to
    /// build it (or point `RIM_BIN` at it).
    #[error("{0}")]
    NoRimBinary(String),
    /// A clock offset was asked of a cluster started without libfaketime.
    #[error("the cluster was started without faketime")]
    NoFaketime,
    /// An I/O error (spawn, log file, listener, signal, run dir, history,
    /// results).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// A process is not healthy within the deadline.
    #[error("{name} not healthy within {within:?} (last: {last}); log tail:\n{log_tail}")]
    Unhealthy {
        /// `node 2`, `gateway`.
        name: String,
        /// The deadline.
        within: Duration,
        /// The last answer or error.
        last: String,
        /// The end of its log.
        log_tail: String,
    },
    /// A process exited on its own.
    #[error("{name} exited on its own with {status}; log tail:\n{log_tail}")]
    Exited {
        /// `node 2`, `gateway`.
        name: String,
        /// Its exit status.
        status: ExitStatus,
        /// The end of its log.
        log_tail: String,
    },
    /// The operation needs a running process.
    #[error("{0} is not running")]
    NotRunning(String),
    /// A line of a history (not the last one) is not a valid operation.
    #[error("history line {line}: {message}")]
    BadHistoryLine {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// Registration or sign-in of a workload user did not succeed in time.
    #[error("setting up user {name}: {last}")]
    UserSetupFailed {
        /// The user name.
        name: String,
        /// The last error.
        last: String,
    },
    /// The nodes do not serve `GroupService` yet: run without groups.
    #[error("the nodes do not serve GroupService ({0})")]
    GroupsUnimplemented(String),
    /// Creating the workload's groups failed until the deadline.
    #[error("setting up groups: {0}")]
    GroupSetupFailed(String),
}

/// Results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Maps an I/O error to [`Error::Io`] saying what was being done.
pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}
