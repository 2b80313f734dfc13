//! Sign-in carried by the upgrade URL, for web clients that cannot send a
//! packet before they know the socket is open (as gim's early web clients
//! did): `/ws?token=T`, plus `user_id=U&device_id=D` for a rim token (an
//! app-signed token names them itself), and `format=json` to be answered in
//! the JSON form from the first message on.
//!
//! The connection then behaves exactly as if its first packet had been
//! `SIGN_IN` with request id 0: the reply (request id 0) is its first
//! message, a refusal closes it.
//!
//! # Invariants
//!
//! * The token is never logged: the query is parsed here and its text goes
//!   only into the sign-in call, and parse errors name the parameter, never
//!   its value.
//! * Bounded: a token over [`MAX_URL_TOKEN`] bytes, a malformed number or
//!   a malformed escape refuses the upgrade (HTTP 400); unknown parameters
//!   are ignored.

use rim_proto::v1::SignInInput;

/// Longest token accepted in the URL (an app-signed token's limit).
pub const MAX_URL_TOKEN: usize = 8 << 10;

/// What the upgrade URL asked for.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct UrlOptions {
    /// A sign-in to run as the connection's first packet.
    pub sign_in: Option<SignInInput>,
    /// Answer in the JSON form from the start.
    pub json: bool,
}

/// Parses the query of the upgrade request (`None`: no query).
pub(crate) fn parse(query: Option<&str>) -> Result<UrlOptions, String> {
    let mut out = UrlOptions::default();
    let (mut token, mut user_id, mut device_id) = (None, 0, 0);
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let number = |name: &str| -> Result<u64, String> {
            value.parse().map_err(|_| format!("{name} must be a decimal number"))
        };
        match key {
            "token" => {
                if value.len() > 3 * MAX_URL_TOKEN {
                    return Err(format!("token over {MAX_URL_TOKEN} bytes"));
                }
                let t = percent_decode(value).ok_or("token: malformed %-escape")?;
                if t.len() > MAX_URL_TOKEN {
                    return Err(format!("token over {MAX_URL_TOKEN} bytes"));
                }
                token = Some(t);
            }
            "user_id" => user_id = number("user_id")?,
            "device_id" => device_id = number("device_id")?,
            "format" => out.json = value == "json",
            _ => {}
        }
    }
    if let Some(token) = token {
        out.sign_in = Some(SignInInput { user_id, device_id, token });
    } else if user_id != 0 || device_id != 0 {
        return Err("user_id and device_id need a token".into());
    }
    Ok(out)
}

/// `%XX` escapes and `+` (a space) decoded; `None` if an escape is
/// malformed or the result is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_parse_into_a_sign_in_or_a_refusal() {
        assert_eq!(parse(None).unwrap(), UrlOptions::default());
        assert_eq!(parse(Some("format=json&x=1")).unwrap(), UrlOptions { sign_in: None, json: true });
        let jwt = parse(Some("token=aa.bb.cc")).unwrap();
        assert_eq!(jwt.sign_in, Some(SignInInput { user_id: 0, device_id: 0, token: "aa.bb.cc".into() }));
        let rim = parse(Some("user_id=5&device_id=7&token=v1%3Aabc%2Bd&format=json")).unwrap();
        assert_eq!(rim.sign_in, Some(SignInInput { user_id: 5, device_id: 7, token: "v1:abc+d".into() }));
        assert!(rim.json);
        for (bad, names) in [
            ("user_id=x&token=t", "user_id"),
            ("token=%zz", "token"),
            ("token=%4", "token"),
            ("user_id=5", "need a token"),
        ] {
            let e = parse(Some(bad)).unwrap_err();
            assert!(e.contains(names), "{bad}: {e}");
        }
        let long = format!("token={}", "a".repeat(MAX_URL_TOKEN + 1));
        let e = parse(Some(&long)).unwrap_err();
        assert!(e.contains("over") && !e.contains("aaaa"), "names the limit, never the value: {e}");
    }
}
