//! Every error code of `docs/api.md` and a table of malformed inputs that must never yield 5xx.

use serde_json::{Value, json};

use crate::support::{problem, spawn_app};

#[tokio::test]
async fn actix_rejections_are_problem_json_with_their_codes() {
    let app = spawn_app().await;
    let cases: Vec<(reqwest::Response, u16, &str)> = vec![
        (
            app.post_raw("/warehouses", "application/json", "{not json")
                .await,
            400,
            "malformed_json",
        ),
        (
            app.post_raw("/warehouses", "text/plain", r#"{"code":"A","name":"B"}"#)
                .await,
            415,
            "unsupported_media_type",
        ),
        (
            app.post_raw("/warehouses", "application/json", vec![b' '; 70_000])
                .await,
            413,
            "payload_too_large",
        ),
        (app.get("/no/such/route").await, 404, "not_found"),
        (
            app.client
                .delete(app.url("/warehouses"))
                .send()
                .await
                .unwrap(),
            405,
            "method_not_allowed",
        ),
        (
            app.client.put(app.url("/products/1")).send().await.unwrap(),
            405,
            "method_not_allowed",
        ),
    ];
    for (res, expected, code) in cases {
        let (status, body) = problem(res).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (expected, Some(code)),
            "{body}"
        );
    }
    assert_eq!(app.scalar("SELECT count(*) FROM warehouse").await, 0);
}

#[tokio::test]
async fn malformed_inputs_are_rejected_with_4xx_naming_the_field_and_change_nothing() {
    let app = spawn_app().await;
    let (w, p) = (app.warehouse("W").await, app.product("p").await);
    let long = "A".repeat(33);
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        // path, body, field named in detail, why it must fail
        (
            "/warehouses",
            json!({"code": "", "name": "x"}),
            "code",
            "empty code",
        ),
        (
            "/warehouses",
            json!({"code": long, "name": "x"}),
            "code",
            "code too long",
        ),
        (
            "/warehouses",
            json!({"code": "wh", "name": "x"}),
            "code",
            "lower-case code",
        ),
        (
            "/warehouses",
            json!({"code": "X'; DROP TABLE warehouse;--", "name": "x"}),
            "code",
            "SQL-looking code",
        ),
        (
            "/warehouses",
            json!({"code": "OK", "name": "   "}),
            "name",
            "blank name",
        ),
        (
            "/warehouses",
            json!({"code": "OK", "name": "x".repeat(201)}),
            "name",
            "name too long",
        ),
        (
            "/warehouses",
            json!({"code": "OK", "name": "nul\u{0}"}),
            "name",
            "control character",
        ),
        (
            "/warehouses",
            json!({"code": "OK"}),
            "name",
            "missing field",
        ),
        (
            "/warehouses",
            json!({"code": "OK", "name": "x", "extra": 1}),
            "extra",
            "unknown field",
        ),
        (
            "/warehouses",
            json!({"code": 5, "name": "x"}),
            "code",
            "wrong type",
        ),
        (
            "/warehouses",
            json!(["OK", "x"]),
            "",
            "an array, not an object",
        ),
        (
            "/products",
            json!({"sku": "has space", "name": "x"}),
            "sku",
            "space in sku",
        ),
        (
            "/products",
            json!({"sku": "ünï", "name": "x"}),
            "sku",
            "unicode sku",
        ),
        (
            "/receipts",
            json!({"warehouse_id": w, "product_id": p, "quantity": 0}),
            "quantity",
            "zero",
        ),
        (
            "/receipts",
            json!({"warehouse_id": w, "product_id": p, "quantity": -3}),
            "quantity",
            "negative",
        ),
        (
            "/receipts",
            json!({"warehouse_id": w, "product_id": p, "quantity": 1_000_000_001}),
            "quantity",
            "above the maximum",
        ),
        (
            "/receipts",
            json!({"warehouse_id": w, "product_id": p, "quantity": 1.5}),
            "quantity",
            "fraction",
        ),
        (
            "/receipts",
            json!({"warehouse_id": w, "product_id": p, "quantity": "7"}),
            "quantity",
            "string number",
        ),
        (
            "/receipts",
            json!({"warehouse_id": w, "product_id": p, "quantity": 1e300}),
            "quantity",
            "huge float",
        ),
        (
            "/receipts",
            json!({"warehouse_id": -1, "product_id": p, "quantity": 1}),
            "warehouse_id",
            "negative id",
        ),
        (
            "/receipts",
            json!({"warehouse_id": w, "product_id": null, "quantity": 1}),
            "product_id",
            "null id",
        ),
        (
            "/shipments",
            json!({"warehouse_id": w, "product_id": p}),
            "quantity",
            "missing quantity",
        ),
        (
            "/transfers",
            json!({"from_warehouse_id": w, "to_warehouse_id": w, "product_id": p, "quantity": 1}),
            "to_warehouse_id",
            "same warehouse twice",
        ),
        (
            "/transfers",
            json!({"from_warehouse_id": w, "to_warehouse_id": 2, "product_id": p, "quantity": 1, "note": "x"}),
            "note",
            "unknown field",
        ),
    ];
    for (path, body, field, why) in cases {
        let (status, problem) = problem(app.post(path, &body).await).await;
        assert_eq!(status, 422, "{why}: {problem}");
        assert_eq!(problem["code"], "validation_failed", "{why}");
        assert!(
            problem["detail"].as_str().unwrap().contains(field),
            "{why}: detail must name {field:?}: {problem}"
        );
    }
    let raw_cases: &[(&str, &[u8])] = &[
        (
            "/receipts",
            br#"{"warehouse_id": 1, "product_id": 1, "quantity": 99999999999999999999999}"#,
        ),
        ("/receipts", b"\xff\xfe garbage"),
        ("/products", br#"{"sku": "a", "name": "b""#),
        ("/products", b"null"),
        ("/products", br#""just a string""#),
        (
            "/products",
            br#"{"sku": "\ud800", "name": "lone surrogate"}"#,
        ),
    ];
    for (path, body) in raw_cases {
        let res = app.post_raw(path, "application/json", body.to_vec()).await;
        let status = res.status().as_u16();
        assert!(
            (400..500).contains(&status),
            "{path} {:?}: {status}",
            String::from_utf8_lossy(body)
        );
        problem(res).await;
    }
    assert_eq!(app.scalar("SELECT count(*) FROM warehouse").await, 1);
    assert_eq!(app.scalar("SELECT count(*) FROM product").await, 1);
    assert_eq!(app.scalar("SELECT count(*) FROM movement").await, 0);
}

#[tokio::test]
async fn unicode_names_and_sql_looking_text_are_stored_verbatim() {
    let app = spawn_app().await;
    let name = "Entrepôt Zürich 倉庫 '); DROP TABLE product; --";
    let res = app
        .post("/products", &json!({"sku": "uni.code_1-2", "name": name}))
        .await;
    assert_eq!(res.status(), 201);
    let created: Value = res.json().await.unwrap();
    let fetched: Value = app
        .get(&format!("/products/{}", created["id"]))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(fetched["name"], name);
}

#[tokio::test]
async fn a_body_that_is_not_json_is_400_malformed_json_on_every_post_route_whatever_comes_first() {
    let app = spawn_app().await;
    let (w, p) = (app.warehouse("W").await, app.product("p").await);
    let routes = [
        ("/warehouses", r#""code": "W2", "name": "n""#.to_owned()),
        ("/products", r#""sku": "p2", "name": "n""#.to_owned()),
        (
            "/receipts",
            format!(r#""warehouse_id": {w}, "product_id": {p}, "quantity": 1"#),
        ),
        (
            "/shipments",
            format!(r#""warehouse_id": {w}, "product_id": {p}, "quantity": 1"#),
        ),
        (
            "/transfers",
            format!(
                r#""from_warehouse_id": {w}, "to_warehouse_id": 1, "product_id": {p}, "quantity": 1"#
            ),
        ),
    ];
    // Each fault follows a field the streaming parser would reject first.
    let firsts = [
        (r#""evil": 1, "#, "an unknown field"),
        (
            r#""quantity": "x", "code": 5, "sku": [], "#,
            "a mistyped field",
        ),
        ("", "valid fields"),
    ];
    for (path, fields) in &routes {
        for (first, before) in firsts {
            let object = format!("{{{first}{fields}}}");
            let open = format!("{{{first}{fields}");
            let cases: Vec<(Vec<u8>, &str)> = vec![
                (open.clone().into_bytes(), "truncated"),
                (format!("{open}, ").into_bytes(), "truncated after a comma"),
                (format!("{object} x").into_bytes(), "trailing garbage"),
                (format!("{object}{object}").into_bytes(), "two documents"),
                (format!("{open},}}").into_bytes(), "a trailing comma"),
                (format!("{open}, \"n\": NaN}}").into_bytes(), "NaN"),
                (
                    format!("{open}, \"n\": Infinity}}").into_bytes(),
                    "Infinity",
                ),
                (
                    format!("{open}, \"n\": \"unterminated}}").into_bytes(),
                    "an unterminated string",
                ),
                (
                    [format!("{open}, \"n\": \"").as_bytes(), b"\xff\xfe\"}"].concat(),
                    "invalid UTF-8",
                ),
                (
                    format!("{open}, \"n\": \"\\ud800\"}}").into_bytes(),
                    "a lone surrogate",
                ),
                (
                    format!("{open} /* note */}}").into_bytes(),
                    "a block comment",
                ),
                (format!("{open} // note\n}}").into_bytes(), "a line comment"),
                (format!("{open}, 'n': 1}}").into_bytes(), "single quotes"),
                (
                    format!("{open}, \"n\": 01}}").into_bytes(),
                    "a leading zero",
                ),
                (
                    format!("{open}, \"n\": 1e999}}").into_bytes(),
                    "a number beyond any double",
                ),
            ];
            for (body, why) in cases {
                let res = app.post_raw(path, "application/json", body).await;
                let (status, problem) = problem(res).await;
                assert_eq!(
                    (status, problem["code"].as_str()),
                    (400, Some("malformed_json")),
                    "POST {path}, {why} after {before}: {problem}"
                );
            }
        }
    }
    assert_eq!(app.scalar("SELECT count(*) FROM warehouse").await, 1);
    assert_eq!(app.scalar("SELECT count(*) FROM product").await, 1);
    assert_eq!(app.scalar("SELECT count(*) FROM movement").await, 0);
    assert_eq!(app.scalar("SELECT count(*) FROM stock_level").await, 0);
}
