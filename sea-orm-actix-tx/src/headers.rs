//! The names of the layer's own headers, defined once. The `Idempotency-Key` header's name and
//! syntax (`docs/api.md`, *Idempotency-Key*): `transaction::idempotency` enforces them and the
//! OpenAPI document (`routes::openapi`) declares them from the same constants, so the document
//! accepts a key exactly when the service does. (They live outside `transaction` because its
//! modules are private.)

use std::ops::RangeInclusive;

/// The request header that makes a `POST` safe to repeat.
pub struct IdempotencyKey;

impl IdempotencyKey {
    /// The header's name.
    pub const NAME: &'static str = "Idempotency-Key";
    /// Shortest and longest key, in bytes (= characters: every allowed byte is ASCII).
    pub const MIN_LEN: usize = 1;
    /// The longest key accepted.
    pub const MAX_LEN: usize = 255;
    /// The bytes a key may contain: visible ASCII (RFC 9110 `VCHAR`), no space.
    pub const BYTES: RangeInclusive<u8> = 0x21..=0x7e;

    /// Whether `value`, one header's value, is a key.
    ///
    /// ```
    /// use sea_orm_actix_tx::headers::IdempotencyKey;
    ///
    /// assert!(IdempotencyKey::accepts(b"order-2026-12-04-0001"));
    /// assert!(!IdempotencyKey::accepts(b""), "1 to 255 characters");
    /// assert!(!IdempotencyKey::accepts(b"with space"), "visible ASCII only");
    /// ```
    pub fn accepts(value: &[u8]) -> bool {
        (Self::MIN_LEN..=Self::MAX_LEN).contains(&value.len())
            && value.iter().all(|b| Self::BYTES.contains(b))
    }

    /// A regular expression (ECMA-262 and Rust `regex` alike) of the strings made of
    /// [`BYTES`](Self::BYTES); the lengths are the schema's `minLength`/`maxLength`.
    pub fn pattern() -> String {
        format!(
            "^[\\x{:02X}-\\x{:02X}]+$",
            Self::BYTES.start(),
            Self::BYTES.end()
        )
    }
}

/// The response header that marks a stored response replayed for a repeated key.
pub const IDEMPOTENT_REPLAYED: &str = "Idempotent-Replayed";

/// The consistency token (`docs/scale-out.md`, *A read replica*): the header a write answers with
/// and a read sends back (`transaction::routing` makes and reads it under these names).
pub const CONSISTENCY_TOKEN: &str = "Consistency-Token";
/// The cookie that carries the same token for clients that keep cookies.
pub const CONSISTENCY_COOKIE: &str = "consistency_token";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pattern_names_the_visible_ascii_range() {
        assert_eq!(IdempotencyKey::pattern(), "^[\\x21-\\x7E]+$");
    }
}
