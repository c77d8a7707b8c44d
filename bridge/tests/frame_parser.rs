//! Property tests of the frame parser: whatever a client sends, parsing
//! returns a request or an error reply, never a panic, and every accepted
//! type or pattern maps to a valid MQTT topic or filter.

use axion_bridge::protocol::{
    parse_frame, truthy, type_to_topic, validate_pattern, validate_type, Request,
};
use proptest::prelude::*;
use serde_json::{json, Value};

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
        prop_oneof![
            Just("fs.change"),
            Just("fs.+"),
            Just("#"),
            Just("a/b"),
            Just("a\0"),
            Just("")
        ]
        .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("action".to_string()),
                    Just("topic".to_string()),
                    Just("message".to_string()),
                    Just("type".to_string()),
                    Just("queue".to_string()),
                    Just("taskId".to_string()),
                    Just("reason".to_string()),
                    Just("task".to_string()),
                    Just("payload".to_string()),
                    Just("source".to_string()),
                    Just("timestamp".to_string()),
                    Just("correlationId".to_string()),
                    Just("replyTo".to_string()),
                    "[a-z]{1,6}",
                ],
                inner,
                0..5
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn action() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just("subscribe"),
        Just("unsubscribe"),
        Just("publish"),
        Just("enqueue"),
        Just("pull"),
        Just("ready"),
        Just("ack"),
        Just("fail"),
        Just("heartbeat"),
        Just("nope")
    ]
    .prop_map(|s| Value::String(s.into()))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn arbitrary_text_never_panics(text in ".{0,200}") {
        if let Err(e) = parse_frame(&text) {
            prop_assert!(e.reply()["error"].is_string());
        }
    }

    #[test]
    fn arbitrary_frames_parse_or_name_the_problem(mut v in json_value(), a in action(), message in json_value()) {
        if let Value::Object(m) = &mut v {
            m.insert("action".into(), a);
            if !m.contains_key("message") {
                m.insert("message".into(), message);
            }
        }
        match parse_frame(&v.to_string()) {
            Ok(Request::Subscribe { topic }) | Ok(Request::Unsubscribe { topic }) => {
                let filter = type_to_topic("axion/p/event/", &topic);
                prop_assert!(rumqttc::v5::mqttbytes::valid_filter(&filter), "{filter}");
            }
            Ok(Request::Publish { message }) => {
                let t = &message.event_type;
                prop_assert!(validate_type(t).is_ok());
                let topic = type_to_topic("axion/p/event/", t);
                prop_assert!(rumqttc::v5::mqttbytes::valid_topic(&topic), "{topic}");
                // The envelope built from the raw fields is valid JSON that
                // agrees with what the client sent.
                let event = message.normalize("sender");
                let frame: Value = serde_json::from_str(&event.frame).expect("frame is JSON");
                let envelope: Value = serde_json::from_str(&event.frame[event.envelope_range()])
                    .expect("envelope is JSON");
                prop_assert_eq!(&frame["event"], &envelope);
                prop_assert_eq!(envelope["type"].as_str(), Some(t.as_ref()));
                let sent = &v["message"];
                if sent.get("payload").is_some() {
                    prop_assert_eq!(&envelope["payload"], &sent["payload"]);
                }
                prop_assert!(envelope["source"].is_string() || truthy(Some(&envelope["source"])));
            }
            Ok(_) => {}
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn accepted_patterns_are_valid_filters(p in "[a-z+#.]{1,20}") {
        if validate_pattern(&p).is_ok() {
            prop_assert!(rumqttc::v5::mqttbytes::valid_filter(&type_to_topic("axion/p/event/", &p)));
        }
    }
}
