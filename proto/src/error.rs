//! Error codes on the wire: classes, gRPC statuses and replies.
//!
//! Every error rim returns carries a stable [`ErrorCode`] (docs/protocol.md,
//! section 6). On the long connection it is `Reply.code`; on gRPC it travels
//! as the decimal value of the [`CODE_METADATA_KEY`] metadata entry next to the
//! gRPC status code of [`ErrorCode::grpc_code`], so every crate builds and
//! reads errors the same way through [`status`] and [`code_of_status`].
//!
//! A client may meet a code newer than itself: [`ErrorClass::of`] classifies
//! any number by its thousands digit, which is what decides the reaction
//! (retry, fix, authenticate, give up, report).

use crate::v1::{ErrorCode, Reply};

pub use crate::metadata::{CODE_METADATA_KEY, LEADER_METADATA_KEY, RETRY_AFTER_METADATA_KEY};

/// What a caller should do about an error, by code range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// 0: success.
    Ok,
    /// 1xxx: retry the same request (with backoff, maybe elsewhere).
    Retry,
    /// 2xxx: the request is wrong; do not retry it unchanged.
    BadRequest,
    /// 3xxx: authenticate again, or the action is not allowed.
    Auth,
    /// 4xxx: a state conflict (not found, not a member, ...).
    Conflict,
    /// 5xxx and anything unknown: a server fault.
    Internal,
}

impl ErrorClass {
    /// The class of any code number, known to this build or not.
    pub fn of(code: i32) -> ErrorClass {
        match code {
            0 => ErrorClass::Ok,
            1000..=1999 => ErrorClass::Retry,
            2000..=2999 => ErrorClass::BadRequest,
            3000..=3999 => ErrorClass::Auth,
            4000..=4999 => ErrorClass::Conflict,
            _ => ErrorClass::Internal,
        }
    }
}

impl ErrorCode {
    /// The class of this code.
    pub fn class(self) -> ErrorClass {
        ErrorClass::of(self as i32)
    }

    /// Whether retrying the same request (same `client_msg_id`) may succeed.
    pub fn is_retryable(self) -> bool {
        self.class() == ErrorClass::Retry
    }

    /// The gRPC status code sent with this error (docs/protocol.md table).
    pub fn grpc_code(self) -> tonic::Code {
        use ErrorCode as E;
        use tonic::Code as C;
        match self {
            E::Ok => C::Ok,
            E::ErrorUnavailable | E::ErrorNotLeader | E::ErrorWrongShard | E::ErrorHookUnavailable => {
                C::Unavailable
            }
            E::ErrorTimeout => C::DeadlineExceeded,
            E::ErrorBusy | E::ErrorRateLimited | E::ErrorGroupFull => C::ResourceExhausted,
            E::ErrorBadRequest
            | E::ErrorMalformedFrame
            | E::ErrorFrameTooLarge
            | E::ErrorInvalidId
            | E::ErrorContentTooLarge => C::InvalidArgument,
            E::ErrorUnknownCommand => C::Unimplemented,
            E::ErrorNotSignedIn
            | E::ErrorUnauthenticated
            | E::ErrorTokenExpired
            | E::ErrorTokenRevoked
            | E::ErrorKicked => C::Unauthenticated,
            E::ErrorPermissionDenied | E::ErrorNotGroupMember | E::ErrorRejectedByApp => C::PermissionDenied,
            E::ErrorUserNotFound
            | E::ErrorDeviceNotFound
            | E::ErrorGroupNotFound
            | E::ErrorMessageNotFound => C::NotFound,
            E::ErrorAlreadyExists => C::AlreadyExists,
            E::ErrorRecallWindowPassed | E::ErrorNotFriend => C::FailedPrecondition,
            E::ErrorInternal => C::Internal,
        }
    }

    /// The best code for a status without `rim-code` (e.g. produced by tonic
    /// itself: transport failures, deadline, decode errors).
    pub fn from_grpc_code(code: tonic::Code) -> ErrorCode {
        use ErrorCode as E;
        use tonic::Code as C;
        match code {
            C::Ok => E::Ok,
            // tonic reports a connection that broke mid-call ("transport
            // error") as `Unknown`: the call's outcome is unknown, so the
            // caller must retry it (every write is idempotent), not give up.
            C::Unavailable | C::Aborted | C::Unknown => E::ErrorUnavailable,
            C::DeadlineExceeded | C::Cancelled => E::ErrorTimeout,
            C::ResourceExhausted => E::ErrorBusy,
            C::InvalidArgument | C::OutOfRange | C::FailedPrecondition => E::ErrorBadRequest,
            C::Unimplemented => E::ErrorUnknownCommand,
            C::Unauthenticated => E::ErrorUnauthenticated,
            C::PermissionDenied => E::ErrorPermissionDenied,
            C::AlreadyExists => E::ErrorAlreadyExists,
            C::NotFound | C::Internal | C::DataLoss => E::ErrorInternal,
        }
    }
}

/// The code of an error status that a gRPC transport made itself, without
/// a [`CODE_METADATA_KEY`] (a request above the server's size limit, an
/// undecodable message, an unknown method): what a rim server adds to such
/// a response so that every error carries a code. Like
/// [`ErrorCode::from_grpc_code`], except that `OUT_OF_RANGE`, which tonic
/// uses only for a message above the size limit, is `ERROR_FRAME_TOO_LARGE`,
/// and `INTERNAL`, which a tonic server makes itself only for a request
/// body it cannot decode (rim's handlers always add their own code), is
/// `ERROR_MALFORMED_FRAME`: the client's fault, not a server fault to
/// report.
pub fn code_of_transport_status(code: tonic::Code) -> ErrorCode {
    match code {
        tonic::Code::OutOfRange => ErrorCode::ErrorFrameTooLarge,
        tonic::Code::Internal => ErrorCode::ErrorMalformedFrame,
        c => ErrorCode::from_grpc_code(c),
    }
}

/// A gRPC error status carrying `code` in [`CODE_METADATA_KEY`].
pub fn status(code: ErrorCode, message: impl Into<String>) -> tonic::Status {
    let mut metadata = tonic::metadata::MetadataMap::new();
    metadata.insert(CODE_METADATA_KEY, (code as i32).into());
    tonic::Status::with_metadata(code.grpc_code(), message, metadata)
}

/// Like [`status`], with the leader's address in [`LEADER_METADATA_KEY`]
/// (dropped if it is not valid ASCII metadata).
pub fn status_with_leader(code: ErrorCode, message: impl Into<String>, leader_addr: &str) -> tonic::Status {
    let mut status = status(code, message);
    if let Ok(value) = leader_addr.parse() {
        status.metadata_mut().insert(LEADER_METADATA_KEY, value);
    }
    status
}

/// Like [`status`], with a retry hint in [`RETRY_AFTER_METADATA_KEY`]
/// (for `ERROR_RATE_LIMITED` and `ERROR_BUSY`; 0 adds none).
pub fn status_with_retry_after(
    code: ErrorCode,
    message: impl Into<String>,
    retry_after_ms: u32,
) -> tonic::Status {
    let mut status = status(code, message);
    if retry_after_ms > 0 {
        status.metadata_mut().insert(RETRY_AFTER_METADATA_KEY, retry_after_ms.into());
    }
    status
}

/// The retry hint of a status in milliseconds (0: none).
pub fn retry_after_of_status(status: &tonic::Status) -> u32 {
    status
        .metadata()
        .get(RETRY_AFTER_METADATA_KEY)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The rim error code of a gRPC status: its `rim-code` entry if present and
/// known, otherwise derived from the gRPC status code. Unknown numbers (from
/// a newer server) are mapped by class.
///
/// A status without `rim-code` that tonic made from an HTTP/2 failure (the
/// peer reset the stream or closed the connection mid-call, e.g. while it
/// shut down) comes as `Internal` with an "h2 protocol error" message; like
/// `Unknown`, its outcome is unknown and it is `ERROR_UNAVAILABLE`
/// (retryable with the same idempotency key). Found in CI: a room send
/// during a leader change failed for good with `ERROR_INTERNAL`.
pub fn code_of_status(status: &tonic::Status) -> ErrorCode {
    let number = status
        .metadata()
        .get(CODE_METADATA_KEY)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<i32>().ok());
    match number {
        Some(n) => code_from_number(n),
        None if status.code() == tonic::Code::Internal
            && status.message().starts_with("h2 protocol error") =>
        {
            ErrorCode::ErrorUnavailable
        }
        None => ErrorCode::from_grpc_code(status.code()),
    }
}

/// The [`ErrorCode`] of a number: itself if known to this build, otherwise a
/// representative of its class (a newer peer's code).
pub fn code_from_number(number: i32) -> ErrorCode {
    ErrorCode::try_from(number).unwrap_or(match ErrorClass::of(number) {
        ErrorClass::Ok => ErrorCode::Ok,
        ErrorClass::Retry => ErrorCode::ErrorUnavailable,
        ErrorClass::BadRequest => ErrorCode::ErrorBadRequest,
        ErrorClass::Auth => ErrorCode::ErrorUnauthenticated,
        ErrorClass::Conflict | ErrorClass::Internal => ErrorCode::ErrorInternal,
    })
}

/// The leader hint of a status, if any.
pub fn leader_of_status(status: &tonic::Status) -> Option<&str> {
    status.metadata().get(LEADER_METADATA_KEY).and_then(|v| v.to_str().ok())
}

impl Reply {
    /// A success reply carrying `data` (an encoded output message).
    pub fn ok(data: impl Into<bytes::Bytes>) -> Reply {
        Reply { code: ErrorCode::Ok as i32, data: data.into(), ..Default::default() }
    }

    /// An error reply.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Reply {
        Reply { code: code as i32, message: message.into(), ..Default::default() }
    }

    /// The reply's code; unknown numbers map by class ([`code_from_number`]).
    pub fn error_code(&self) -> ErrorCode {
        code_from_number(self.code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every code this build knows (they are all below 6000).
    fn all_codes() -> Vec<ErrorCode> {
        (0..6000).filter_map(|n| ErrorCode::try_from(n).ok()).collect()
    }

    #[test]
    fn retry_hints_round_trip() {
        let s = status_with_retry_after(ErrorCode::ErrorRateLimited, "slow down", 1500);
        assert_eq!(code_of_status(&s), ErrorCode::ErrorRateLimited);
        assert_eq!(retry_after_of_status(&s), 1500);
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert!(ErrorCode::ErrorRateLimited.is_retryable());
        assert_eq!(retry_after_of_status(&status(ErrorCode::ErrorBusy, "x")), 0);
        let none = status_with_retry_after(ErrorCode::ErrorBusy, "x", 0);
        assert!(none.metadata().get(RETRY_AFTER_METADATA_KEY).is_none());
    }

    #[test]
    fn status_round_trips_every_code() {
        for code in all_codes().into_iter().filter(|c| *c != ErrorCode::Ok) {
            let s = status(code, "x");
            assert_eq!(s.code(), code.grpc_code());
            assert_eq!(code_of_status(&s), code);
            assert_eq!(Reply::error(code, "x").error_code(), code);
        }
    }

    #[test]
    fn unknown_codes_map_by_class() {
        assert_eq!(Reply::error(ErrorCode::Ok, "").error_code(), ErrorCode::Ok);
        let r = Reply { code: 1999, ..Default::default() };
        assert_eq!(r.error_code(), ErrorCode::ErrorUnavailable);
        assert!(r.error_code().is_retryable());
        assert_eq!(Reply { code: 2999, ..Default::default() }.error_code(), ErrorCode::ErrorBadRequest);
        assert_eq!(Reply { code: -5, ..Default::default() }.error_code(), ErrorCode::ErrorInternal);
        assert_eq!(ErrorCode::ErrorKicked.class(), ErrorClass::Auth);
    }

    #[test]
    fn leader_hint_and_plain_statuses() {
        let s = status_with_leader(ErrorCode::ErrorNotLeader, "moved", "10.0.0.2:7001");
        assert_eq!(leader_of_status(&s), Some("10.0.0.2:7001"));
        assert_eq!(code_of_status(&s), ErrorCode::ErrorNotLeader);
        let plain = tonic::Status::deadline_exceeded("slow");
        assert_eq!(code_of_status(&plain), ErrorCode::ErrorTimeout);
        // A connection broken mid-call: outcome unknown, retry.
        let broken = tonic::Status::unknown("transport error");
        assert_eq!(code_of_status(&broken), ErrorCode::ErrorUnavailable);
        assert!(code_of_status(&broken).is_retryable());
        // An HTTP/2 failure mid-call (tonic's wording): also unknown, retry.
        let reset = tonic::Status::internal("h2 protocol error: http2 error");
        assert_eq!(code_of_status(&reset), ErrorCode::ErrorUnavailable);
        assert_eq!(
            code_of_status(&tonic::Status::internal("a bare internal error")),
            ErrorCode::ErrorInternal
        );
        // Our own internal errors carry rim-code and stay final.
        assert_eq!(code_of_status(&status(ErrorCode::ErrorInternal, "bug")), ErrorCode::ErrorInternal);
    }

    /// docs/protocol.md's error table lists exactly the codes of error.proto.
    #[test]
    fn protocol_doc_lists_every_code() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md"))
            .expect("docs/protocol.md");
        let rows: Vec<(i32, String)> = doc
            .lines()
            .filter_map(|line| {
                let mut cells = line.split('|').map(str::trim).skip(1);
                let number = cells.next()?.parse::<i32>().ok()?;
                let name = cells.next()?.trim_matches('`').to_string();
                Some((number, name))
            })
            .filter(|(_, name)| name == "OK" || name.starts_with("ERROR_"))
            .collect();
        let expected: Vec<(i32, String)> =
            all_codes().into_iter().map(|c| (c as i32, c.as_str_name().to_string())).collect();
        assert_eq!(rows, expected);
    }
}
