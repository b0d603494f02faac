//! The OpenAPI schemas of the domain's validated values, built from the constants their parsers
//! use (`Sku::MAX_CHARS`, `Quantity::MAX`, ...), so the document allows exactly what a handler
//! accepts. Request types point at them with `#[schema(value_type = ...)]`.

use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, Schema, SchemaFormat, Type};
use utoipa::{PartialSchema, ToSchema};

use crate::domain::values::{Id, Name, Quantity, Sku, WarehouseCode};

fn text(description: &str, max_chars: usize, pattern: &str) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some(description))
        .min_length(Some(1))
        .max_length(Some(max_chars))
        .pattern(Some(pattern))
        .into()
}

fn integer(description: &str, minimum: i64, maximum: i64) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
        .description(Some(description))
        .minimum(Some(minimum))
        .maximum(Some(maximum))
        .into()
}

impl PartialSchema for WarehouseCode {
    fn schema() -> RefOr<Schema> {
        text(
            "1..=32 characters of A-Z 0-9 _ -",
            Self::MAX_CHARS,
            Self::PATTERN,
        )
    }
}
impl ToSchema for WarehouseCode {}

impl PartialSchema for Sku {
    fn schema() -> RefOr<Schema> {
        text(
            "1..=64 characters of A-Z a-z 0-9 . _ -",
            Self::MAX_CHARS,
            Self::PATTERN,
        )
    }
}
impl ToSchema for Sku {}

impl PartialSchema for Name {
    fn schema() -> RefOr<Schema> {
        text(
            "1..=200 characters, not blank, no control characters",
            Self::MAX_CHARS,
            Self::PATTERN,
        )
    }
}
impl ToSchema for Name {}

impl PartialSchema for Quantity {
    fn schema() -> RefOr<Schema> {
        integer("An amount moved: 1..=1,000,000,000", 1, Self::MAX)
    }
}
impl ToSchema for Quantity {}

impl PartialSchema for Id {
    fn schema() -> RefOr<Schema> {
        integer("A positive 64-bit id", 1, i64::MAX)
    }
}
impl ToSchema for Id {}
