//! What users hand the node as text: API request bodies (JSON), the
//! Docker plugin's call bodies and state file (JSON), and the config file
//! (TOML). Parsing arbitrary bytes never panics; a body that parses
//! survives a round trip through its JSON form.

#![no_main]

use libfuzzer_sys::fuzz_target;
use node::api::{
    ApiTokenBody, AttachBody, CloneBody, CreateBody, JoinBody, ReplicasBody, ResizeBody, TokenBody, UnlockBody,
};
use node::cluster::snapshots::{RestoreBody, ScheduleBody, SnapshotBody};
use node::daemon::config::ConfigFile;

fn round_trip<T: serde::Serialize + serde::de::DeserializeOwned>(data: &[u8]) {
    if let Ok(value) = serde_json::from_slice::<T>(data) {
        let text = serde_json::to_vec(&value).expect("a parsed body serializes");
        serde_json::from_slice::<T>(&text).expect("a serialized body parses");
    }
}

fuzz_target!(|data: &[u8]| {
    round_trip::<CreateBody>(data);
    round_trip::<ResizeBody>(data);
    round_trip::<ReplicasBody>(data);
    round_trip::<AttachBody>(data);
    round_trip::<TokenBody>(data);
    round_trip::<JoinBody>(data);
    round_trip::<ApiTokenBody>(data);
    round_trip::<UnlockBody>(data);
    round_trip::<SnapshotBody>(data);
    round_trip::<RestoreBody>(data);
    round_trip::<ScheduleBody>(data);
    round_trip::<CloneBody>(data);
    if let Ok(request) = node::plugin::decode_request(data) {
        // Create's options: checked and turned into a volume, or refused; never a panic.
        let _ = node::plugin::create_body(&request);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = node::plugin::decode_state(text);
        if let Ok(file) = toml::from_str::<ConfigFile>(text) {
            // Resolving checks addresses and labels: errors, never panics.
            let _ = node::daemon::config::NodeConfig::resolve(file, ConfigFile::default());
        }
    }
});
