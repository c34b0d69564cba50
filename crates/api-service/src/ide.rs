//! The browser IDEs, GraphQL Playground (at `/graphql/`) and GraphiQL (at `/graphiql`), served
//! from this binary: their code is vendored under `assets/` (`scripts/vendor-ide`, with the
//! licenses) and compiled in, so the pages work offline and no script comes from another host.
//! Each page sends HTTP to its own URL and the websocket to the same URL's `ws(s)://`, which NGINX
//! (and the embedded mode) hands to the gateway.
//!
//! The pages carry a Content-Security-Policy that allows only their own origin: scripts are
//! files (none inline), and the connections go back to where the page came from. Playground
//! styles its components with `<style>` elements it writes itself (styled-components), hence
//! `style-src 'unsafe-inline'`; nothing else is relaxed.

use actix_web::http::header;
use actix_web::{web, HttpResponse};

/// Where the assets are served; NGINX sends `/graphql/…` to api-service.
pub const ASSETS: &str = "/graphql/assets";
const PLAYGROUND: &str = "playground-1.7.28";
const GRAPHIQL: &str = "graphiql-5.4.0";

pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self' data:; \
     connect-src 'self'; worker-src 'self' blob:; object-src 'none'; base-uri 'none'; \
     form-action 'self'; frame-ancestors 'none'";

/// One file served under [`ASSETS`].
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
    /// Vendored files live under a versioned directory, so they never change under one URL.
    immutable: bool,
}

/// A file of `assets/`, compiled in.
macro_rules! asset {
    ($path:literal, $content_type:literal, $immutable:literal) => {
        Asset {
            path: $path,
            content_type: $content_type,
            body: include_bytes!(concat!("../assets/", $path)),
            immutable: $immutable,
        }
    };
}

const FILES: &[Asset] = &[
    asset!(
        "playground-1.7.28/middleware.js",
        "text/javascript; charset=utf-8",
        true
    ),
    asset!(
        "playground-1.7.28/middleware.css",
        "text/css; charset=utf-8",
        true
    ),
    asset!("playground-1.7.28/favicon.png", "image/png", true),
    asset!(
        "graphiql-5.4.0/graphiql.js",
        "text/javascript; charset=utf-8",
        true
    ),
    asset!(
        "graphiql-5.4.0/graphiql.css",
        "text/css; charset=utf-8",
        true
    ),
    asset!("graphiql-5.4.0/codicon.ttf", "font/ttf", true),
    asset!(
        "graphiql-5.4.0/editor.worker.js",
        "text/javascript; charset=utf-8",
        true
    ),
    asset!(
        "graphiql-5.4.0/json.worker.js",
        "text/javascript; charset=utf-8",
        true
    ),
    asset!(
        "graphiql-5.4.0/graphql.worker.js",
        "text/javascript; charset=utf-8",
        true
    ),
    asset!(
        "gqlws/playground.js",
        "text/javascript; charset=utf-8",
        false
    ),
];

pub fn config(cfg: &mut web::ServiceConfig) {
    cfg.route(&format!("{ASSETS}/{{path:.+}}"), web::get().to(asset));
}

async fn asset(path: web::Path<String>) -> HttpResponse {
    let Some(file) = FILES.iter().find(|file| file.path == path.as_str()) else {
        return HttpResponse::NotFound()
            .content_type("application/json")
            .body(r#"{"detail":"Not found."}"#);
    };
    let cache = if file.immutable {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    HttpResponse::Ok()
        .content_type(file.content_type)
        .insert_header((header::CACHE_CONTROL, cache))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .body(file.body)
}

/// An IDE page, with the policy.
pub fn page(body: String) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(body)
}

/// GraphQL Playground, the reference's IDE.
pub fn playground_page() -> String {
    format!(
        r#"<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="user-scalable=no, initial-scale=1.0, minimum-scale=1.0, maximum-scale=1.0, minimal-ui">
  <title>GraphQL Playground</title>
  <link rel="stylesheet" href="{ASSETS}/{PLAYGROUND}/middleware.css">
  <link rel="icon" href="{ASSETS}/{PLAYGROUND}/favicon.png">
  <script src="{ASSETS}/{PLAYGROUND}/middleware.js"></script>
</head>
<body>
  <div id="root"></div>
  <script src="{ASSETS}/gqlws/playground.js"></script>
</body>
</html>
"#
    )
}

/// GraphiQL 5, with its subscriptions over graphql-ws.
pub fn graphiql_page() -> String {
    format!(
        r#"<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>GraphiQL</title>
  <link rel="stylesheet" href="{ASSETS}/{GRAPHIQL}/graphiql.css">
  <link rel="icon" href="{ASSETS}/{PLAYGROUND}/favicon.png">
  <style>body {{ margin: 0; }} #graphiql {{ height: 100dvh; }}</style>
</head>
<body>
  <div id="graphiql"></div>
  <script src="{ASSETS}/{GRAPHIQL}/graphiql.js"></script>
</body>
</html>
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_a_page_names_is_served() {
        let page = playground_page();
        let named: Vec<&str> = page
            .split('"')
            .filter_map(|part| part.strip_prefix(&format!("{ASSETS}/")))
            .collect();
        assert_eq!(named.len(), 4, "{page}");
        for path in named {
            assert!(
                FILES.iter().any(|file| file.path == path),
                "{path} is not served"
            );
        }
        assert!(!page.contains("http"), "no other host: {page}");
    }
}
