//! Copies MQTT.js's browser bundle into the build for the fleet view page
//! (`src/web.rs`). It comes from the npm registry (`scripts/setup.sh` runs
//! `npm ci` in `bridge/web`), never from the repository; without it the
//! page says how to get it instead of connecting.

use std::path::Path;

fn main() {
    let bundle = Path::new("web/node_modules/mqtt/dist/mqtt.min.js");
    println!("cargo:rerun-if-changed={}", bundle.display());
    println!("cargo:rerun-if-changed=web/node_modules/mqtt/package.json");
    let out = Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR")).join("mqtt.min.js");
    let copied = bundle.exists() && std::fs::copy(bundle, &out).is_ok();
    if !copied {
        println!("cargo:warning=bridge/web/node_modules/mqtt is missing: the fleet view page is built without MQTT.js (scripts/setup.sh installs it)");
        std::fs::write(
            &out,
            "/* built without MQTT.js: run scripts/setup.sh, then rebuild */\n",
        )
        .expect("write the stand-in");
    }
}
