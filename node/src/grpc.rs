//! What every gRPC server of a node shares: request size limits and a
//! `rim-code` on every error response.
//!
//! Handlers answer errors with [`rim_proto::error::status`], which carries
//! the stable code in the `rim-code` metadata. Some errors never reach a
//! handler: tonic refuses a request above the size limit (`OUT_OF_RANGE`),
//! an undecodable message or an unknown method before any rim code runs.
//! [`fill_rim_code`] adds the code such a response lacks
//! ([`rim_proto::error::code_of_transport_status`]), so docs/protocol.md's
//! promise holds: every error has a `rim-code`.

use http::{HeaderValue, Response};
use rim_proto::error::{CODE_METADATA_KEY, code_of_transport_status};

/// Largest client gRPC request a node decodes: every client operation is
/// at most `Limits::max_op_bytes` (128 KiB) encoded; beyond this the request
/// is refused with `ERROR_FRAME_TOO_LARGE` before it is decoded.
pub const MAX_CLIENT_REQUEST: usize = 1 << 20;

/// How often a node's servers ping an idle HTTP/2 connection.
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
/// How long a ping may go unanswered before the connection is dropped.
pub const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Adds `rim-code` to an error response that has a `grpc-status` but no
/// code (a trailers-only response made by the transport).
pub fn fill_rim_code<B>(mut response: Response<B>) -> Response<B> {
    let headers = response.headers_mut();
    if headers.contains_key(CODE_METADATA_KEY) {
        return response;
    }
    let Some(status) = headers.get("grpc-status").and_then(|v| v.to_str().ok()?.parse::<i32>().ok()) else {
        return response;
    };
    if status != 0 {
        let code = code_of_transport_status(tonic::Code::from_i32(status));
        headers.insert(CODE_METADATA_KEY, HeaderValue::from(code as i32));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use rim_proto::ErrorCode;

    fn response(headers: &[(&'static str, &str)]) -> Response<()> {
        let mut r = Response::new(());
        for &(k, v) in headers {
            r.headers_mut().insert(k, v.parse().unwrap());
        }
        r
    }

    fn rim_code(r: &Response<()>) -> Option<i32> {
        r.headers().get(CODE_METADATA_KEY).map(|v| v.to_str().unwrap().parse().unwrap())
    }

    #[test]
    fn transport_errors_get_a_code_and_handler_codes_are_kept() {
        let too_large = fill_rim_code(response(&[("grpc-status", "11")]));
        assert_eq!(rim_code(&too_large), Some(ErrorCode::ErrorFrameTooLarge as i32));
        let undecodable = fill_rim_code(response(&[("grpc-status", "13")]));
        assert_eq!(rim_code(&undecodable), Some(ErrorCode::ErrorMalformedFrame as i32));
        let unknown = fill_rim_code(response(&[("grpc-status", "12")]));
        assert_eq!(rim_code(&unknown), Some(ErrorCode::ErrorUnknownCommand as i32));
        let handler = fill_rim_code(response(&[("grpc-status", "5"), (CODE_METADATA_KEY, "4000")]));
        assert_eq!(rim_code(&handler), Some(4000), "a handler's code is never replaced");
        assert_eq!(rim_code(&fill_rim_code(response(&[("grpc-status", "0")]))), None, "success");
        assert_eq!(rim_code(&fill_rim_code(response(&[]))), None, "headers of a streaming reply");
    }
}
