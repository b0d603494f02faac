//! A validator for the subset of JSON Schema 2020-12 that the service's OpenAPI document uses,
//! so that the contract tests can hold real responses and requests against the document's
//! schemas. A keyword or format it does not know is a panic, not a pass: when the document
//! starts using one, this file is extended instead of silently checking less.

use regex::Regex;
use serde_json::{Map, Value, json};

/// Validates values against the schemas of one OpenAPI document (`$ref`s resolve inside it).
pub struct Validator<'a> {
    document: &'a Value,
}

impl<'a> Validator<'a> {
    pub fn new(document: &'a Value) -> Self {
        Validator { document }
    }

    /// The named schema of `#/components/schemas`.
    pub fn component(&self, name: &str) -> &'a Value {
        let schema = &self.document["components"]["schemas"][name];
        assert!(!schema.is_null(), "the document has no schema {name:?}");
        schema
    }

    /// Where `value` breaks `schema`, one line per fault with its JSON path; empty when valid.
    pub fn errors(&self, schema: &Value, value: &Value) -> Vec<String> {
        let mut errors = Vec::new();
        self.check(schema, value, "$", &mut errors);
        errors
    }

    fn resolve(&self, reference: &str) -> &'a Value {
        let pointer = reference
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("only local $refs are supported, got {reference:?}"));
        self.document
            .pointer(pointer)
            .unwrap_or_else(|| panic!("dangling $ref {reference:?}"))
    }

    fn check(&self, schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
        let schema = match schema {
            Value::Bool(true) => return,
            Value::Bool(false) => return errors.push(format!("{at}: no value is allowed here")),
            Value::Object(schema) => schema,
            other => panic!("not a schema: {other}"),
        };
        for (keyword, arg) in schema {
            let fault = match keyword.as_str() {
                "$ref" => {
                    let target = self.resolve(arg.as_str().expect("$ref is a string"));
                    self.check(target, value, at, errors);
                    None
                }
                "type" => type_fault(arg, value),
                "enum" => (!array(arg).contains(value)).then(|| format!("{value} is not in {arg}")),
                "const" => (arg != value).then(|| format!("{value} is not {arg}")),
                "properties" => {
                    if let Value::Object(object) = value {
                        for (name, property) in arg.as_object().expect("properties is an object") {
                            if let Some(v) = object.get(name) {
                                self.check(property, v, &format!("{at}.{name}"), errors);
                            }
                        }
                    }
                    None
                }
                "required" => value.as_object().and_then(|object| {
                    let missing: Vec<&Value> = array(arg)
                        .iter()
                        .filter(|name| !object.contains_key(name.as_str().unwrap_or_default()))
                        .collect();
                    (!missing.is_empty()).then(|| format!("missing required {missing:?}"))
                }),
                "additionalProperties" => {
                    if let Value::Object(object) = value {
                        self.check_additional(schema, arg, object, at, errors);
                    }
                    None
                }
                "items" => {
                    if let Value::Array(items) = value {
                        for (i, item) in items.iter().enumerate() {
                            self.check(arg, item, &format!("{at}[{i}]"), errors);
                        }
                    }
                    None
                }
                "oneOf" | "anyOf" | "allOf" => {
                    let matching = array(arg)
                        .iter()
                        .filter(|sub| self.errors(sub, value).is_empty())
                        .count();
                    let ok = match keyword.as_str() {
                        "oneOf" => matching == 1,
                        "anyOf" => matching >= 1,
                        _ => matching == array(arg).len(),
                    };
                    (!ok).then(|| format!("{value} matches {matching} of {keyword} {arg}"))
                }
                "minimum" | "maximum" | "exclusiveMinimum" | "exclusiveMaximum" => {
                    bound_fault(keyword, arg, value)
                }
                "minLength" | "maxLength" => value.as_str().and_then(|s| {
                    let (count, limit) = (s.chars().count() as u64, arg.as_u64().unwrap_or(0));
                    let ok = if keyword == "minLength" {
                        count >= limit
                    } else {
                        count <= limit
                    };
                    (!ok).then(|| format!("{count} characters breaks {keyword} {limit}"))
                }),
                "pattern" => value.as_str().and_then(|s| {
                    let pattern = arg.as_str().expect("pattern is a string");
                    let regex = Regex::new(pattern)
                        .unwrap_or_else(|e| panic!("pattern {pattern:?} does not compile: {e}"));
                    (!regex.is_match(s)).then(|| format!("{s:?} does not match {pattern:?}"))
                }),
                "format" => format_fault(arg.as_str().expect("format is a string"), value),
                "description" | "title" | "examples" | "example" | "default" | "deprecated"
                | "readOnly" | "writeOnly" => None,
                other => panic!(
                    "the document uses the keyword {other:?}, which tests/tests/api/support/json_schema.rs \
                     does not check yet: extend it"
                ),
            };
            if let Some(fault) = fault {
                errors.push(format!("{at}: {fault}"));
            }
        }
    }

    fn check_additional(
        &self,
        schema: &Map<String, Value>,
        additional: &Value,
        object: &Map<String, Value>,
        at: &str,
        errors: &mut Vec<String>,
    ) {
        let declared = schema.get("properties").and_then(Value::as_object);
        for (name, v) in object {
            if declared.is_some_and(|d| d.contains_key(name)) {
                continue;
            }
            self.check(additional, v, &format!("{at}.{name}"), errors);
        }
    }
}

fn array(arg: &Value) -> &Vec<Value> {
    arg.as_array()
        .unwrap_or_else(|| panic!("expected an array, got {arg}"))
}

fn is_integer(value: &Value) -> bool {
    value.is_i64() || value.is_u64() || value.as_f64().is_some_and(|f| f.fract() == 0.0)
}

fn type_fault(arg: &Value, value: &Value) -> Option<String> {
    let types: Vec<&str> = match arg {
        Value::String(one) => vec![one.as_str()],
        many => array(many).iter().filter_map(Value::as_str).collect(),
    };
    let ok = types.iter().any(|t| match *t {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "string" => value.is_string(),
        "number" => value.is_number(),
        "integer" => is_integer(value),
        "array" => value.is_array(),
        "object" => value.is_object(),
        other => panic!("unknown type {other:?}"),
    });
    (!ok).then(|| format!("{value} is not of type {arg}"))
}

/// Integers compare exactly (ids reach `i64::MAX`), other numbers as doubles.
fn bound_fault(keyword: &str, arg: &Value, value: &Value) -> Option<String> {
    let exact = |v: &Value| {
        v.as_i64()
            .map(i128::from)
            .or_else(|| v.as_u64().map(i128::from))
    };
    let ordering = match (exact(value), exact(arg)) {
        (Some(v), Some(limit)) => v.cmp(&limit),
        _ => value.as_f64()?.partial_cmp(&arg.as_f64()?)?,
    };
    let ok = match keyword {
        "minimum" => ordering.is_ge(),
        "maximum" => ordering.is_le(),
        "exclusiveMinimum" => ordering.is_gt(),
        _ => ordering.is_lt(),
    };
    (!ok).then(|| format!("{value} breaks {keyword} {arg}"))
}

fn in_range(value: &Value, min: i128, max: i128) -> bool {
    let exact = value
        .as_i64()
        .map(i128::from)
        .or_else(|| value.as_u64().map(i128::from));
    match exact {
        Some(v) => (min..=max).contains(&v),
        None => value
            .as_f64()
            .is_some_and(|f| f.fract() == 0.0 && f >= min as f64 && f < (max + 1) as f64),
    }
}

fn format_fault(format: &str, value: &Value) -> Option<String> {
    let ok = match format {
        // A whole number in range, however it is written (62.0 is the int64 62).
        "int64" => !value.is_number() || in_range(value, i64::MIN.into(), i64::MAX.into()),
        "int32" => !value.is_number() || in_range(value, i32::MIN.into(), i32::MAX.into()),
        "double" | "float" => true,
        "date-time" => value
            .as_str()
            .is_none_or(|s| chrono::DateTime::parse_from_rfc3339(s).is_ok()),
        other => panic!("unknown format {other:?}: extend tests/tests/api/support/json_schema.rs"),
    };
    (!ok).then(|| format!("{value} is not a valid {format}"))
}

#[test]
fn the_validator_finds_each_kind_of_fault() {
    let document = json!({"components": {"schemas": {
        "Id": {"type": "integer", "format": "int64", "minimum": 1},
        "Thing": {
            "type": "object",
            "required": ["id", "code"],
            "additionalProperties": false,
            "properties": {
                "id": {"$ref": "#/components/schemas/Id"},
                "code": {"type": "string", "minLength": 1, "maxLength": 3, "pattern": "^[A-Z]+$"},
                "kind": {"type": "string", "enum": ["a", "b"]},
                "at": {"type": ["string", "null"], "format": "date-time"},
                "tags": {"type": "array", "items": {"type": "string"}}
            }
        }
    }}});
    let v = Validator::new(&document);
    let thing = v.component("Thing");
    let valid = json!({"id": 1, "code": "AB", "kind": "a", "at": null, "tags": ["x"]});
    assert_eq!(v.errors(thing, &valid), Vec::<String>::new());
    assert!(
        v.errors(
            thing,
            &json!({"id": 1, "code": "AB", "at": "2026-01-01T00:00:00Z"})
        )
        .is_empty()
    );
    let invalid = [
        (json!({"code": "AB"}), "missing id"),
        (json!({"id": 0, "code": "AB"}), "id below minimum"),
        (json!({"id": 1.5, "code": "AB"}), "fractional id"),
        (json!({"id": 1, "code": ""}), "code too short"),
        (json!({"id": 1, "code": "ABCD"}), "code too long"),
        (json!({"id": 1, "code": "ab"}), "code off pattern"),
        (
            json!({"id": 1, "code": "A", "kind": "c"}),
            "kind not in enum",
        ),
        (
            json!({"id": 1, "code": "A", "at": "yesterday"}),
            "not a date-time",
        ),
        (
            json!({"id": 1, "code": "A", "tags": [1]}),
            "item of the wrong type",
        ),
        (
            json!({"id": 1, "code": "A", "extra": true}),
            "additional property",
        ),
        (json!([1]), "not an object"),
    ];
    for (value, why) in invalid {
        assert!(!v.errors(thing, &value).is_empty(), "{why}: {value}");
    }
}
