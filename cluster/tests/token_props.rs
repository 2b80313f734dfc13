//! Property tests of device tokens: round trip, tamper detection, no panics.

use proptest::prelude::*;
use rim_cluster::{Claims, TokenError, TokenKey};
use rim_proto::ids::{DeviceId, UserId};

fn key() -> TokenKey {
    TokenKey::from_secret("proptest cluster secret").unwrap()
}

fn claims() -> impl Strategy<Value = Claims> {
    (any::<u64>(), any::<u64>(), any::<i64>(), any::<u64>()).prop_map(
        |(user_id, device_id, expires_at_ms, token_version)| Claims {
            user_id: UserId(user_id),
            device_id: DeviceId(device_id),
            expires_at_ms,
            token_version,
        },
    )
}

proptest! {
    #[test]
    fn round_trip(c in claims(), before in 1i64..1_000_000) {
        let t = key().sign(&c);
        prop_assert!(t.len() <= rim_cluster::MAX_TOKEN_LEN);
        prop_assert!(t.is_ascii());
        let now = c.expires_at_ms.saturating_sub(before);
        if now < c.expires_at_ms {
            prop_assert_eq!(key().verify(&t, now), Ok(c));
        }
        prop_assert_eq!(key().verify(&t, c.expires_at_ms), Err(TokenError::Expired));
    }

    #[test]
    fn arbitrary_strings_never_verify(s in any::<String>(), now in any::<i64>()) {
        prop_assert!(key().verify(&s, now).is_err());
    }

    #[test]
    fn token_shaped_strings_never_verify(
        s in "v1\\.(0|[1-9][0-9]{0,19})\\.(0|[1-9][0-9]{0,19})\\.-?(0|[1-9][0-9]{0,18})\\.(0|[1-9][0-9]{0,19})\\.[0-9a-f]{64}",
        now in any::<i64>(),
    ) {
        let r = key().verify(&s, now);
        prop_assert!(matches!(r, Err(TokenError::BadSignature | TokenError::Malformed)), "{:?}", r);
    }

    #[test]
    fn any_single_char_change_fails(c in claims(), idx in any::<prop::sample::Index>(), ch in any::<char>()) {
        let t = key().sign(&c);
        let chars: Vec<char> = t.chars().collect();
        let i = idx.index(chars.len());
        prop_assume!(chars[i] != ch);
        let mut changed = chars.clone();
        changed[i] = ch;
        let changed: String = changed.into_iter().collect();
        prop_assert!(key().verify(&changed, i64::MIN).is_err(), "{} verified", changed);
    }

    #[test]
    fn truncations_and_extensions_fail(c in claims(), cut in any::<prop::sample::Index>(), tail in ".{1,4}") {
        let t = key().sign(&c);
        let n = cut.index(t.len());
        prop_assert!(key().verify(&t[..n], i64::MIN).is_err());
        let longer = format!("{t}{tail}");
        prop_assert!(key().verify(&longer, i64::MIN).is_err());
    }

    #[test]
    fn other_secret_never_verifies(c in claims(), secret in "[a-z]{1,20}") {
        prop_assume!(secret != "proptest cluster secret");
        let other = TokenKey::from_secret(&secret).unwrap();
        prop_assert_eq!(other.verify(&key().sign(&c), i64::MIN), Err(TokenError::BadSignature));
    }
}
