//! Values that can be invalid, parsed once at the edge into types that cannot be: a handler or a
//! domain function only ever holds a valid `WarehouseCode`, `Sku`, `Name`, `Quantity` or `Id`.
//! Each parse error names the field and says what is allowed.

use std::fmt;

/// A value that failed to parse, with the field it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidValue {
    pub field: &'static str,
    pub reason: String,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> InvalidValue {
    InvalidValue {
        field,
        reason: reason.into(),
    }
}

fn bounded_chars(
    field: &'static str,
    raw: &str,
    max: usize,
    allowed: impl Fn(char) -> bool,
    allowed_text: &str,
) -> Result<String, InvalidValue> {
    let count = raw.chars().count();
    if count == 0 || count > max {
        return Err(invalid(
            field,
            format!("must be 1 to {max} characters, got {count}"),
        ));
    }
    if let Some(bad) = raw.chars().find(|c| !allowed(*c)) {
        return Err(invalid(
            field,
            format!("{bad:?} is not allowed; use only {allowed_text}"),
        ));
    }
    Ok(raw.to_owned())
}

/// A warehouse code: 1..=32 characters of `A-Z 0-9 _ -`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarehouseCode(String);

impl WarehouseCode {
    pub const MAX_CHARS: usize = 32;
    /// The alphabet as a JSON Schema (ECMA-262) pattern, for the OpenAPI document.
    pub const PATTERN: &str = "^[A-Z0-9_-]+$";

    pub fn parse(raw: &str) -> Result<Self, InvalidValue> {
        bounded_chars(
            "code",
            raw,
            Self::MAX_CHARS,
            |c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_' || c == '-',
            "A-Z, 0-9, '_' and '-'",
        )
        .map(WarehouseCode)
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A product SKU: 1..=64 characters of `A-Z a-z 0-9 . _ -`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sku(String);

impl Sku {
    pub const MAX_CHARS: usize = 64;
    /// The alphabet as a JSON Schema (ECMA-262) pattern, for the OpenAPI document.
    pub const PATTERN: &str = "^[A-Za-z0-9._-]+$";

    pub fn parse(raw: &str) -> Result<Self, InvalidValue> {
        bounded_chars(
            "sku",
            raw,
            Self::MAX_CHARS,
            |c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'),
            "A-Z, a-z, 0-9, '.', '_' and '-'",
        )
        .map(Sku)
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A display name: 1..=200 characters, not blank, no control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Name(String);

impl Name {
    pub const MAX_CHARS: usize = 200;
    /// "No control character (`char::is_control`: U+0000-U+001F, U+007F-U+009F), and at least
    /// one that is not white space (`char::is_whitespace`)" as a JSON Schema (ECMA-262) pattern,
    /// for the OpenAPI document. The classes are spelled out because `\s` differs between
    /// regex engines (ECMA-262 counts U+FEFF, Rust does not).
    pub const PATTERN: &str = concat!(
        r"^[^\x00-\x1F\x7F-\x9F]*",
        r"[^\x00-\x20\x7F-\xA0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]",
        r"[^\x00-\x1F\x7F-\x9F]*$"
    );

    pub fn parse(raw: &str) -> Result<Self, InvalidValue> {
        let name = bounded_chars(
            "name",
            raw,
            Self::MAX_CHARS,
            |c| !c.is_control(),
            "printable characters",
        )?;
        if name.trim().is_empty() {
            return Err(invalid("name", "must not be blank"));
        }
        Ok(Name(name))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A quantity moved: 1..=1,000,000,000.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantity(i64);

impl Quantity {
    pub const MAX: i64 = 1_000_000_000;

    pub fn parse(raw: i64) -> Result<Self, InvalidValue> {
        if (1..=Self::MAX).contains(&raw) {
            Ok(Quantity(raw))
        } else {
            Err(invalid(
                "quantity",
                format!("must be an integer from 1 to {}, got {raw}", Self::MAX),
            ))
        }
    }
    pub fn get(self) -> i64 {
        self.0
    }
}

/// A positive 64-bit id, as given by a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Id(i64);

impl Id {
    pub fn parse(field: &'static str, raw: i64) -> Result<Self, InvalidValue> {
        if raw >= 1 {
            Ok(Id(raw))
        } else {
            Err(invalid(
                field,
                format!("must be a positive integer, got {raw}"),
            ))
        }
    }
    pub fn get(self) -> i64 {
        self.0
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A page request of a keyset-paginated list: `limit` 1..=500 (default 50), `after` an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    pub limit: u64,
    pub after: i64,
}

impl Page {
    pub const DEFAULT_LIMIT: u64 = 50;
    pub const MAX_LIMIT: u64 = 500;

    pub fn parse(limit: Option<&str>, after: Option<&str>) -> Result<Self, InvalidValue> {
        let limit = match limit {
            None => Self::DEFAULT_LIMIT,
            Some(raw) => raw
                .parse::<u64>()
                .ok()
                .filter(|l| (1..=Self::MAX_LIMIT).contains(l))
                .ok_or_else(|| {
                    invalid(
                        "limit",
                        format!(
                            "must be an integer from 1 to {}, got {raw:?}",
                            Self::MAX_LIMIT
                        ),
                    )
                })?,
        };
        let after = match after {
            None => 0,
            Some(raw) => raw.parse::<i64>().ok().filter(|a| *a >= 0).ok_or_else(|| {
                invalid(
                    "after",
                    format!("must be a non-negative integer id, got {raw:?}"),
                )
            })?,
        };
        Ok(Page { limit, after })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warehouse_codes_accept_only_their_alphabet_and_length() {
        assert!(WarehouseCode::parse("WH-01_A").is_ok());
        assert!(WarehouseCode::parse(&"A".repeat(32)).is_ok());
        let bad = [
            ("", "empty"),
            ("wh1", "lower case"),
            ("WH 1", "space"),
            (&"A".repeat(33) as &str, "33 characters"),
            ("WH1'; DROP TABLE warehouse;--", "SQL-looking"),
            ("WHÉ", "non-ASCII"),
        ];
        for (raw, why) in bad {
            let err = WarehouseCode::parse(raw).expect_err(why);
            assert_eq!(err.field, "code", "{why}");
        }
    }

    #[test]
    fn skus_accept_dots_and_lower_case_but_not_spaces() {
        assert!(Sku::parse("abc.DEF_1-2").is_ok());
        assert!(Sku::parse(&"a".repeat(64)).is_ok());
        for raw in ["", "a b", "a/b", &"a".repeat(65)] {
            assert_eq!(Sku::parse(raw).expect_err(raw).field, "sku");
        }
    }

    #[test]
    fn names_are_counted_in_characters_and_may_not_be_blank() {
        assert!(Name::parse("Entrepôt Zürich 倉庫").is_ok());
        assert!(Name::parse(&"é".repeat(200)).is_ok());
        for raw in ["", "   ", "a\u{0}b", "tab\there", &"é".repeat(201)] {
            assert_eq!(Name::parse(raw).expect_err(raw).field, "name");
        }
    }

    #[test]
    fn quantities_are_bounded() {
        assert_eq!(Quantity::parse(1).map(Quantity::get), Ok(1));
        assert!(Quantity::parse(1_000_000_000).is_ok());
        for raw in [0, -1, 1_000_000_001, i64::MAX, i64::MIN] {
            assert_eq!(
                Quantity::parse(raw).expect_err("out of range").field,
                "quantity"
            );
        }
    }

    #[test]
    fn pages_default_and_reject_bad_limits() {
        assert_eq!(
            Page::parse(None, None),
            Ok(Page {
                limit: 50,
                after: 0
            })
        );
        assert_eq!(
            Page::parse(Some("500"), Some("7")),
            Ok(Page {
                limit: 500,
                after: 7
            })
        );
        for (limit, after, field) in [
            (Some("0"), None, "limit"),
            (Some("501"), None, "limit"),
            (Some("x"), None, "limit"),
            (None, Some("-1"), "after"),
            (None, Some("1e3"), "after"),
        ] {
            assert_eq!(Page::parse(limit, after).expect_err(field).field, field);
        }
    }
}
