//! The strict JSON body extractor. It differs from `actix_web::web::Json` in what a client is
//! told: a body without a JSON content type is 415, one over `APP_BODY_LIMIT` is 413, text that
//! is not JSON is 400 `malformed_json`, and JSON of the wrong shape is 422 `validation_failed`
//! with the path of the offending field (`quantity: invalid type ...`), found with
//! `serde_path_to_error` because serde_json's own messages do not name the field. The syntax of
//! the whole body is checked before its shape: a streaming parse into `T` stops at the first
//! unknown or mistyped field and would call `{"sku": 1, "name": ` a shape problem.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{FromRequest, HttpRequest, web};
use serde::Deserializer;
use serde::de::{self, DeserializeOwned, Unexpected, Visitor};

use crate::problem::ApiError;

/// The largest body [`JsonBody`] reads (`APP_BODY_LIMIT`), registered as `web::Data<BodyLimit>`;
/// without it, `APP_BODY_LIMIT`'s default.
#[derive(Clone, Copy, Debug)]
pub struct BodyLimit(pub usize);

/// A request body parsed as `T`, which should `#[serde(deny_unknown_fields)]`.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned + 'static> FromRequest for JsonBody<T> {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<mime::Mime>().ok())
            .is_some_and(|m| {
                m.type_() == mime::APPLICATION
                    && (m.subtype() == mime::JSON || m.suffix() == Some(mime::JSON))
            });
        let limit = req
            .app_data::<web::Data<BodyLimit>>()
            .map_or(sea_orm_actix_tx::DEFAULT_BODY_LIMIT, |l| l.0);
        let mut payload = payload.take();
        Box::pin(async move {
            if !is_json {
                return Err(ApiError::UnsupportedMediaType);
            }
            let body = sea_orm_actix_tx::read_body(&mut payload, limit).await?;
            Ok(JsonBody(parse_object(&body)?))
        })
    }
}

/// Parses `body` as `T`, which must be written as a JSON object: serde also accepts a struct
/// written as an array, the API takes objects only.
///
/// Fails with `MalformedJson` when `body` is not JSON and with `Validation` when it is JSON of
/// another shape, as [`parse`] does.
pub fn parse_object<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    // The common case first: an object that parses as `T` is valid JSON throughout (`T` denies
    // unknown fields, so no part of it went unread), and needs no path kept to name a faulty
    // field. Only a body that fails is parsed again as a generic value, to tell its syntax error
    // (400) from its shape error (422), and then as `T` with the path.
    let object = body.trim_ascii_start().starts_with(b"{");
    if object && let Ok(value) = serde_json::from_slice(body) {
        return Ok(value);
    }
    if !check_syntax(body)?.is_object() {
        return Err(ApiError::Validation("body: expected a JSON object".into()));
    }
    parse_shape(body)
}

/// Parses `body` as `T`, telling syntax errors (400) from shape errors (422).
///
/// Fails with `MalformedJson` when `body` is not JSON, whatever comes before the fault, and with
/// `Validation`, naming the field, when it is JSON of another shape.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    check_syntax(body)?;
    parse_shape(body)
}

/// The typed parse of a body whose syntax was checked; a syntax error found here all the same is
/// still reported as one.
fn parse_shape<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        if inner.is_syntax() || inner.is_eof() || inner.is_io() {
            ApiError::MalformedJson(format!("the request body is not valid JSON: {inner}"))
        } else if path == "." {
            ApiError::Validation(format!("body: {inner}"))
        } else {
            ApiError::Validation(format!("{path}: {inner}"))
        }
    })?;
    de.end()
        .map_err(|e| ApiError::MalformedJson(format!("the request body is not valid JSON: {e}")))?;
    Ok(value)
}

/// The whole body parsed as a generic value, which checks everything a typed parse may not reach:
/// the syntax after the first bad field, the UTF-8 of every string, the surrogate pairs of every
/// `\u` escape, the range of every number. It is parsed again into `T` afterwards, from the bytes,
/// so that a duplicate field stays an error instead of the last one silently winning.
fn check_syntax(body: &[u8]) -> Result<serde_json::Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::MalformedJson(format!("the request body is not valid JSON: {e}")))
}

/// `#[serde(deserialize_with = "crate::json::integer")]` for an integer field of a request body.
/// JSON has a single number type, and JSON Schema's `integer` (which the OpenAPI document uses)
/// is any number without a fractional part, so `62.0` is the integer 62; `62.5` is not an integer.
/// Like every JSON parser that reads numbers as doubles (JavaScript's among them), a literal with
/// a fraction or exponent is read as the nearest double first, so beyond 2^53 it may be rounded:
/// clients send ids as plain integers, which are read exactly.
pub fn integer<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    struct Integer;

    impl Visitor<'_> for Integer {
        type Value = i64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an integer")
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<i64, E> {
            Ok(v)
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<i64, E> {
            i64::try_from(v).map_err(|_| E::invalid_value(Unexpected::Unsigned(v), &self))
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<i64, E> {
            // -2^63 and 2^63 are exact doubles; every whole double in between converts exactly.
            const LIMIT: f64 = 9_223_372_036_854_775_808.0;
            if v.fract() == 0.0 && (-LIMIT..LIMIT).contains(&v) {
                Ok(v as i64)
            } else {
                Err(E::invalid_type(Unexpected::Float(v), &self))
            }
        }
    }

    deserializer.deserialize_any(Integer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        quantity: i64,
        name: String,
    }

    #[test]
    fn a_wrong_type_is_a_validation_error_naming_the_field() {
        let err = parse::<Body>(br#"{"quantity":"x","name":"a"}"#).unwrap_err();
        assert_eq!(err.code(), "validation_failed");
        assert!(err.to_string().starts_with("quantity:"), "{err}");
    }

    #[test]
    fn an_unknown_field_is_a_validation_error_naming_it() {
        let err = parse::<Body>(br#"{"quantity":1,"name":"a","evil":1}"#).unwrap_err();
        assert_eq!(err.code(), "validation_failed");
        assert!(err.to_string().contains("evil"), "{err}");
    }

    #[test]
    fn a_missing_field_is_a_validation_error_naming_it() {
        let err = parse::<Body>(br#"{"quantity":1}"#).unwrap_err();
        assert!(err.to_string().contains("name"), "{err}");
    }

    #[test]
    fn text_that_is_not_json_is_malformed() {
        for body in [
            &b"{"[..],
            b"nope",
            b"",
            b"{\"quantity\":1,\"name\":\"a\"} trailing",
        ] {
            let err = parse::<Body>(body).unwrap_err();
            assert_eq!(err.code(), "malformed_json", "{body:?}");
        }
    }

    #[test]
    fn a_lone_surrogate_is_malformed() {
        let err = parse::<Body>(br#"{"quantity":1,"name":"\ud800"}"#).unwrap_err();
        assert_eq!(err.code(), "malformed_json", "{err}");
    }

    #[test]
    fn the_syntax_of_the_whole_body_is_checked_before_its_fields() {
        let cases: &[(&[u8], &str)] = &[
            (
                br#"{"evil": 1, "name": "#,
                "truncated after an unknown field",
            ),
            (
                br#"{"quantity": "x", "name": "a"} x"#,
                "garbage after a mistyped field",
            ),
            (
                br#"{"evil": 1, "quantity": 1, "name": "a",}"#,
                "trailing comma",
            ),
            (br#"{"evil": 1, "quantity": NaN, "name": "a"}"#, "NaN"),
            (br#"{"quantity": "x", "name": "a}"#, "unterminated string"),
            (
                b"{\"evil\": 1, \"quantity\": 1, \"name\": \"\xff\"}",
                "invalid UTF-8",
            ),
            (
                br#"{"evil": 1, /* no */ "quantity": 1, "name": "a"}"#,
                "a comment",
            ),
            (
                br#"{"evil": 1, "quantity": 1, "name": "\udc00"}"#,
                "lone surrogate",
            ),
            (
                br#"{"evil": 1, "quantity": 1e999, "name": "a"}"#,
                "number beyond f64",
            ),
        ];
        for (body, why) in cases {
            let err = parse_object::<Body>(body).unwrap_err();
            assert_eq!(err.code(), "malformed_json", "{why}: {err}");
        }
    }

    #[test]
    fn a_duplicate_field_is_a_validation_error() {
        let err = parse_object::<Body>(br#"{"quantity":1,"name":"a","name":"b"}"#).unwrap_err();
        assert_eq!(err.code(), "validation_failed", "{err}");
    }

    #[test]
    fn json_that_is_not_an_object_is_a_validation_error() {
        for body in [&br#"[1, "a"]"#[..], b"null", b"1", br#""text""#] {
            let err = parse_object::<Body>(body).unwrap_err();
            assert_eq!(err.code(), "validation_failed", "{body:?}: {err}");
        }
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Count {
        #[serde(deserialize_with = "integer")]
        n: i64,
    }

    #[test]
    fn an_integer_may_be_written_with_a_zero_fraction_or_an_exponent() {
        for (body, n) in [
            (&br#"{"n": 62}"#[..], 62),
            (br#"{"n": 62.0}"#, 62),
            (br#"{"n": 6.2e1}"#, 62),
            (br#"{"n": -3}"#, -3),
            (br#"{"n": 9223372036854775807}"#, i64::MAX),
            (br#"{"n": -9223372036854775808}"#, i64::MIN),
        ] {
            assert_eq!(
                parse_object::<Count>(body).map(|c| c.n).ok(),
                Some(n),
                "{body:?}"
            );
        }
    }

    #[test]
    fn a_number_that_is_not_a_64_bit_integer_is_a_validation_error_naming_the_field() {
        for body in [
            &br#"{"n": 62.5}"#[..],
            br#"{"n": 9223372036854775808}"#,
            br#"{"n": 9.3e18}"#,
            br#"{"n": -1e300}"#,
            br#"{"n": "62"}"#,
            br#"{"n": null}"#,
            br#"{"n": true}"#,
        ] {
            let err = parse_object::<Count>(body).unwrap_err();
            assert_eq!(err.code(), "validation_failed", "{body:?}");
            assert!(err.to_string().starts_with("n:"), "{err}");
        }
    }

    #[test]
    fn a_number_too_large_for_i64_is_a_validation_error() {
        let err = parse::<Body>(br#"{"quantity":99999999999999999999,"name":"a"}"#).unwrap_err();
        assert_eq!(err.code(), "validation_failed");
    }
}
