//! The fleet view: a static page at `/` on the WebSocket listener that
//! connects back over MQTT over WebSocket (`/mqtt`) and shows every
//! instance's heartbeat and every queue's stats live, as `axion monitor`
//! does in a terminal. The assets are in the binary: nothing is built or
//! fetched at run time. MQTT.js comes from the npm registry at build time
//! (see `build.rs`).

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

const INDEX: &str = include_str!("../web/index.html");
const APP: &str = include_str!("../web/app.js");
const MQTT_JS: &str = include_str!(concat!(env!("OUT_DIR"), "/mqtt.min.js"));

/// The asset at `path`, if it is one of the page's.
pub fn asset(path: &str) -> Option<Response> {
    let (body, kind) = match path {
        "/" | "/index.html" => (INDEX, "text/html; charset=utf-8"),
        "/app.js" => (APP, "text/javascript; charset=utf-8"),
        "/mqtt.min.js" => (MQTT_JS, "text/javascript; charset=utf-8"),
        _ => return None,
    };
    Some(
        (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, kind),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            body,
        )
            .into_response(),
    )
}
