//! The service's OpenAPI 3.1 document, derived from the handlers' `#[utoipa::path]`
//! annotations and the types they send and take (`UserConfig` with its ranges, `Stored`,
//! `Readiness`, `ErrorBody`), served at `GET /openapi.json` and kept in the repository as
//! `docs/openapi.json` (a test fails when the two differ: `UPDATE_OPENAPI=1 cargo test -p
//! userconfig-cli --lib openapi` writes it again).

use std::sync::LazyLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "userconfig",
        description = "Per-user configuration served from a chain of cache tiers, with the \
            database as the authority. Every error is `{\"error\": {\"kind\", \"message\", \
            \"request_id\"}}`; every response carries `X-Request-Id`.",
        license(name = "MIT OR Apache-2.0"),
    ),
    paths(
        super::api::get_config,
        super::api::put_config,
        super::api::patch_config,
        super::api::delete_config,
        super::events::config_events,
        super::changes::changes,
        super::history::history,
        super::history::diff,
        super::history::rollback,
        super::api::ready,
        super::healthz,
        super::stats,
        super::metrics,
        super::dashboard_data,
    ),
    modifiers(&Bearer),
    tags(
        (name = "configuration", description = "One user's configuration"),
        (name = "operations", description = "Health, statistics and metrics (`admin`)"),
    ),
)]
struct Document;

/// The `bearer` scheme: a service token (`uc_…`) or an end user's JWT.
struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A service token with the route's scope (`read`, `write`, `admin`), or \
                         an end user's JWT (its `sub`'s configuration only)",
                    ))
                    .build(),
            ),
        );
    }
}

/// The document as JSON, made once.
pub(crate) fn json() -> &'static str {
    static JSON: LazyLock<String> = LazyLock::new(|| {
        let mut document =
            serde_json::to_value(Document::openapi()).expect("the document serializes");
        headers_are_strings(&mut document);
        let mut text = serde_json::to_string_pretty(&document).expect("JSON prints");
        text.push('\n');
        text
    });
    &JSON
}

/// utoipa types an optional header as `["string", "null"]`, but a header is absent or a
/// string, never `null`: its type becomes `string` (the parameter stays optional).
fn headers_are_strings(document: &mut serde_json::Value) {
    let Some(paths) = document["paths"].as_object_mut() else {
        return;
    };
    for operation in paths
        .values_mut()
        .filter_map(|p| p.as_object_mut())
        .flat_map(|p| p.values_mut())
    {
        // `get_mut`, not indexing: indexing would add `"parameters": null` where none are.
        let Some(parameters) = operation
            .get_mut("parameters")
            .and_then(serde_json::Value::as_array_mut)
        else {
            continue;
        };
        for parameter in parameters.iter_mut().filter(|p| p["in"] == "header") {
            parameter["schema"]["type"] = serde_json::json!("string");
        }
    }
}

/// `GET /openapi.json` (open: the contract is public).
pub(crate) async fn document() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], json()).into_response()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_document_in_the_repository_is_the_one_served() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json");
        if std::env::var_os("UPDATE_OPENAPI").is_some() {
            std::fs::write(path, super::json()).unwrap();
        }
        let kept = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            kept == super::json(),
            "docs/openapi.json differs from the document the code derives: run \
             UPDATE_OPENAPI=1 cargo test -p userconfig-cli --lib openapi"
        );
    }
}
