//! The dashboard's static files (`src/admin/dashboard/`, see its README), embedded in the
//! binary at build time: `GET /` is the page, `GET /static/<file>` its scripts and styles.
//! Public, like the login: the page holds no data, it calls `/api/v5` with the token it gets.
//! Must not grow logic: what the dashboard shows comes from the API.

use axum::extract::Path;
use axum::http::{header, HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// What the page may load and connect to: its own files and API, and any WebSocket (the web
/// MQTT client connects to the broker's WS listener, another port, hence another origin).
/// MQTT.js runs its keep-alive timer in a worker made from a `blob:` URL. No inline script or
/// style and no eval; nobody may frame the page (its buttons kick and ban).
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self' ws: wss:; worker-src 'self' blob:; object-src 'none'; \
                   base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($name:literal, $content_type:expr) => {
        Asset {
            name: $name,
            content_type: $content_type,
            body: include_bytes!(concat!("dashboard/", $name)),
        }
    };
}

const INDEX: Asset = asset!("index.html", HTML);

/// Everything under `/static/`; a test checks that it is the whole directory but the page
/// and the README.
const STATIC: &[Asset] = &[
    asset!("app.js", JS),
    asset!("lib.js", JS),
    asset!("charts.js", JS),
    asset!("views.js", JS),
    asset!("link.js", JS),
    asset!("webclient.js", JS),
    asset!("mqtt.min.js", JS),
    asset!("style.css", CSS),
];

/// `GET /` and `GET /static/{file}`, for any router state.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { serve(&INDEX) }))
        .route("/static/{file}", get(static_file))
}

async fn static_file(Path(file): Path<String>) -> Response {
    match STATIC.iter().find(|asset| asset.name == file) {
        Some(asset) => serve(asset),
        None => (StatusCode::NOT_FOUND, "no such dashboard file").into_response(),
    }
}

fn serve(asset: &'static Asset) -> Response {
    let headers: [(HeaderName, &'static str); 5] = [
        (header::CONTENT_TYPE, asset.content_type),
        // Revalidate every time: after an upgrade the browser must not mix old and new modules.
        (header::CACHE_CONTROL, "no-cache"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::REFERRER_POLICY, "no-referrer"),
    ];
    (headers, asset.body).into_response()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn dashboard_dir() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/admin/dashboard")
    }

    fn text(asset: &Asset) -> &'static str {
        std::str::from_utf8(asset.body).expect("the dashboard's files are UTF-8")
    }

    #[test]
    fn every_dashboard_file_is_served() {
        let on_disk: BTreeSet<String> = std::fs::read_dir(dashboard_dir())
            .expect("src/admin/dashboard exists")
            .map(|entry| {
                entry
                    .expect("readable")
                    .file_name()
                    .into_string()
                    .expect("UTF-8 name")
            })
            .filter(|name| name != "README.md" && name != "index.html")
            .collect();
        let served: BTreeSet<String> = STATIC.iter().map(|a| a.name.to_owned()).collect();
        assert_eq!(
            on_disk, served,
            "add new dashboard files to STATIC (and the README)"
        );
    }

    #[test]
    fn every_file_the_page_loads_is_served() {
        // `static/<file>` in the page, `from "./<file>"` in the modules.
        let mut wanted = BTreeSet::new();
        for piece in text(&INDEX).split("static/").skip(1) {
            wanted.insert(piece.split('"').next().unwrap_or_default().to_owned());
        }
        for asset in STATIC
            .iter()
            .filter(|a| a.name.ends_with(".js") && a.name != "mqtt.min.js")
        {
            for piece in text(asset).split("from \"./").skip(1) {
                wanted.insert(piece.split('"').next().unwrap_or_default().to_owned());
            }
        }
        assert!(
            wanted.contains("app.js") && wanted.contains("views.js"),
            "{wanted:?}"
        );
        for name in &wanted {
            assert!(
                STATIC.iter().any(|a| a.name == name.as_str()),
                "the page loads {name}, which is not served"
            );
        }
    }

    #[tokio::test]
    async fn unknown_files_are_not_found_and_known_ones_carry_their_type() {
        let response = static_file(Path("nope.js".to_owned())).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let response = static_file(Path("app.js".to_owned())).await;
        assert_eq!(response.status(), StatusCode::OK);
        // ES modules run only when sent as JavaScript.
        assert_eq!(response.headers()[header::CONTENT_TYPE], JS);
        assert_eq!(serve(&INDEX).headers()[header::CONTENT_TYPE], HTML);
    }
}
