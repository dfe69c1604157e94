//! The OpenAPI document is snapshot-tested so API changes show in review.
//! After an intended change: `INSTA_UPDATE=always cargo test openapi` (or
//! `cargo insta review`), and commit the snapshot.

#[test]
fn openapi_document_matches_the_snapshot() {
    let doc = tollgate::http::docs::openapi();
    let json = serde_json::to_string_pretty(&doc).unwrap();
    insta::assert_snapshot!("openapi", json);
}

#[test]
fn every_v1_route_requires_an_api_key_in_the_document() {
    let doc = serde_json::to_value(tollgate::http::docs::openapi()).unwrap();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if path.starts_with("/v1/") {
                assert!(op["security"].is_array(), "{method} {path} documents its API key");
            }
        }
    }
}

#[test]
fn every_v1_operation_documents_the_rate_limit() {
    let doc = serde_json::to_value(tollgate::http::docs::openapi()).unwrap();
    let limited = &doc["components"]["responses"]["RateLimited"];
    assert!(limited["headers"]["Retry-After"].is_object(), "{limited}");
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let documented = op["responses"]["429"]["$ref"] == "#/components/responses/RateLimited";
            assert_eq!(documented, path.starts_with("/v1/"), "{method} {path}");
        }
    }
}
