//! Warehouses and products: create, read, list with keyset pages.

use serde_json::{Value, json};

use crate::support::{problem, spawn_app};

#[tokio::test]
async fn creating_a_warehouse_returns_201_with_location_and_it_can_be_read_back() {
    let app = spawn_app().await;
    let res = app
        .post("/warehouses", &json!({"code": "WH-1", "name": "Main"}))
        .await;
    assert_eq!(res.status(), 201);
    let location = res.headers()["location"].to_str().unwrap().to_owned();
    let created: Value = res.json().await.unwrap();
    assert_eq!(location, format!("/warehouses/{}", created["id"]));
    assert_eq!(created["code"], "WH-1");
    assert!(created["created_at"].as_str().unwrap().ends_with('Z'));

    let fetched: Value = app.get(&location).await.json().await.unwrap();
    assert_eq!(fetched, created);
}

#[tokio::test]
async fn a_duplicate_code_or_sku_is_409_already_exists_and_changes_nothing() {
    let app = spawn_app().await;
    app.warehouse("DUP").await;
    let (status, body) = problem(
        app.post("/warehouses", &json!({"code": "DUP", "name": "Again"}))
            .await,
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("already_exists"))
    );
    app.product("sku-1").await;
    let (status, body) = problem(
        app.post("/products", &json!({"sku": "sku-1", "name": "Again"}))
            .await,
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("already_exists"))
    );
    assert_eq!(app.scalar("SELECT count(*) FROM warehouse").await, 1);
    assert_eq!(app.scalar("SELECT count(*) FROM product").await, 1);
}

#[tokio::test]
async fn unknown_ids_are_404_not_found() {
    let app = spawn_app().await;
    for path in [
        "/warehouses/999",
        "/products/999",
        "/warehouses/999/stock",
        "/products/999/stock",
        "/products/0",
        "/products/-5",
        "/products/abc",
        "/products/99999999999999999999999",
    ] {
        let (status, body) = problem(app.get(path).await).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (404, Some("not_found")),
            "{path}"
        );
    }
}

#[tokio::test]
async fn lists_are_keyset_paginated_in_id_order() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(app.product(&format!("p{i}")).await);
    }
    let first: Value = app.get("/products?limit=2").await.json().await.unwrap();
    let got: Vec<i64> = first["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_i64().unwrap())
        .collect();
    assert_eq!(got, ids[..2]);
    assert_eq!(first["next_after"], ids[1]);

    let mut seen = got;
    let mut after = first["next_after"].as_i64();
    while let Some(a) = after {
        let page: Value = app
            .get(&format!("/products?limit=2&after={a}"))
            .await
            .json()
            .await
            .unwrap();
        seen.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["id"].as_i64().unwrap()),
        );
        after = page["next_after"].as_i64();
    }
    assert_eq!(seen, ids);

    let all: Value = app.get("/warehouses").await.json().await.unwrap();
    assert_eq!(all, json!({"items": [], "next_after": null}));
}

#[tokio::test]
async fn bad_page_parameters_are_422_naming_the_parameter() {
    let app = spawn_app().await;
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=x", "limit"),
        ("after=-1", "after"),
        ("after=1.5", "after"),
        ("bogus=1", "bogus"),
    ] {
        for list in ["/warehouses", "/products", "/movements"] {
            let (status, body) = problem(app.get(&format!("{list}?{query}")).await).await;
            assert_eq!(status, 422, "{list}?{query}");
            assert!(
                body["detail"].as_str().unwrap().contains(field),
                "{list}?{query}: {body}"
            );
        }
    }
}

#[tokio::test]
async fn head_answers_like_get_without_a_body() {
    let app = spawn_app().await;
    let id = app.product("HEAD-1").await;
    let res = app
        .client
        .head(app.url(&format!("/products/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "application/json");
    assert!(res.bytes().await.unwrap().is_empty());
    for (path, status) in [("/products/999999", 404), ("/health/live", 200)] {
        let res = app.client.head(app.url(path)).send().await.unwrap();
        assert_eq!(res.status(), status, "HEAD {path}");
    }
}
