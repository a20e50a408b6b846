//! Property tests of the options store's set semantics: a set that is
//! accepted leaves a parameter set that passes the check again; a set that
//! is refused leaves the settings exactly as they were; and the QMP form of
//! any update reads back to the same update.

use migration::options::check::check_parameters;
use migration::options::{
    BitmapAlias, Capabilities, Capability, CapabilityStatus, FixedHostSupport, MigrationOptions,
    MultiFdCompression, NodeAlias, ParametersUpdate, RecordingHooks,
};
use migration::qapi::StrOrNull;
use proptest::prelude::*;
use std::sync::Arc;

/// Mostly values every u64 parameter accepts, sometimes edges and anything.
fn u64_value() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => 1..=1000u64,
        1 => 0..=200_000u64,
        1 => 1_999_990..=2_000_010u64,
        1 => any::<u64>(),
    ]
}

/// Mostly values every u8 parameter accepts (given a low cpu-throttle-initial), sometimes anything.
fn u8_value() -> impl Strategy<Value = u8> {
    prop_oneof![6 => 1..=9u8, 1 => any::<u8>()]
}

/// Mostly valid XBZRLE cache sizes, sometimes anything.
fn cache_size() -> impl Strategy<Value = u64> {
    prop_oneof![3 => (12u32..40).prop_map(|s| 1u64 << s), 1 => u64_value()]
}

fn opt<S: Strategy>(s: S) -> impl Strategy<Value = Option<S::Value>> {
    prop::option::weighted(0.3, s)
}

fn str_or_null() -> impl Strategy<Value = StrOrNull> {
    prop_oneof![Just(StrOrNull::Null), "[a-z]{0,3}".prop_map(StrOrNull::Str)]
}

fn compression() -> impl Strategy<Value = MultiFdCompression> {
    prop::sample::select(MultiFdCompression::ALL.to_vec())
}

fn mapping() -> impl Strategy<Value = Vec<NodeAlias>> {
    let bitmap = ("[xy]", "[xy]").prop_map(|(name, alias)| BitmapAlias {
        name,
        alias,
        transform: None,
    });
    let node = ("[ab]", "[ab0-]{0,2}", prop::collection::vec(bitmap, 0..3)).prop_map(
        |(node_name, alias, bitmaps)| NodeAlias {
            node_name,
            alias,
            bitmaps,
        },
    );
    prop::collection::vec(node, 0..3)
}

fn update() -> impl Strategy<Value = ParametersUpdate> {
    let a = (
        opt(u64_value()),
        opt(u64_value()),
        opt(u64_value()),
        opt(u64_value()),
        opt(u8_value()),
        opt(u8_value()),
        opt(any::<bool>()),
        opt(u8_value()),
        opt(u8_value()),
        opt(u8_value()),
        opt(u8_value()),
        opt(any::<bool>()),
    );
    let b = (
        opt(str_or_null()),
        opt(str_or_null()),
        opt(str_or_null()),
        opt(u64_value()),
        opt(u64_value()),
        opt(any::<u32>()),
        opt(any::<bool>()),
        opt(u8_value()),
        opt(cache_size()),
        opt(u64_value()),
        opt(u8_value()),
    );
    let c = (
        opt(compression()),
        opt(u8_value()),
        opt(u8_value()),
        opt(mapping()),
    );
    (a, b, c).prop_map(|(a, b, c)| ParametersUpdate {
        announce_initial: a.0,
        announce_max: a.1,
        announce_rounds: a.2,
        announce_step: a.3,
        compress_level: a.4,
        compress_threads: a.5,
        compress_wait_thread: a.6,
        decompress_threads: a.7,
        throttle_trigger_threshold: a.8,
        cpu_throttle_initial: a.9,
        cpu_throttle_increment: a.10,
        cpu_throttle_tailslow: a.11,
        tls_creds: b.0,
        tls_hostname: b.1,
        tls_authz: b.2,
        max_bandwidth: b.3,
        downtime_limit: b.4,
        x_checkpoint_delay: b.5,
        block_incremental: b.6,
        multifd_channels: b.7,
        xbzrle_cache_size: b.8,
        max_postcopy_bandwidth: b.9,
        max_cpu_throttle: b.10,
        multifd_compression: c.0,
        multifd_zlib_level: c.1,
        multifd_zstd_level: c.2,
        block_bitmap_mapping: c.3,
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn accepted_sets_pass_again_and_rejected_sets_change_nothing(
        zero_copy in any::<bool>(),
        in_postcopy in any::<bool>(),
        updates in prop::collection::vec(update(), 1..8),
    ) {
        let store = MigrationOptions::new();
        if zero_copy {
            store
                .set_capabilities(
                    &[
                        CapabilityStatus::new(Capability::Multifd, true),
                        CapabilityStatus::new(Capability::ZeroCopySend, true),
                    ],
                    &FixedHostSupport::capable(),
                )
                .unwrap();
        }
        let hooks = Arc::new(RecordingHooks::new());
        store.register_hooks(hooks.clone());
        store.set_running(true);
        store.set_in_postcopy(in_postcopy);
        let caps = store.caps();

        let mut accepted = 0usize;
        for update in &updates {
            let before = store.params();
            let calls_before = hooks.calls().len();
            match store.set_parameters(update) {
                Ok(()) => {
                    accepted += 1;
                    let after = store.params();
                    prop_assert!(check_parameters(&after, &caps).is_ok());
                    prop_assert_eq!(&*after, &before.merged(update));
                }
                Err(err) => {
                    prop_assert_eq!(&*store.params(), &*before);
                    prop_assert_eq!(hooks.calls().len(), calls_before);
                    // The refusal is the check's verdict on the merged set.
                    let verdict = check_parameters(&before.merged(update), &caps);
                    prop_assert_eq!(verdict.err().map(|e| e.to_string()), Some(err.to_string()));
                }
            }
            prop_assert_eq!(store.caps(), caps);
        }
        prop_assert!(accepted <= updates.len());
    }

    #[test]
    fn qmp_form_of_any_update_reads_back(update in update()) {
        let args = update.to_qmp();
        prop_assert_eq!(ParametersUpdate::from_qmp(&args).unwrap(), update);
    }

    #[test]
    fn any_capability_set_accepted_passes_again_and_refused_changes_nothing(
        changes in prop::collection::vec(
            (prop::sample::select(Capability::ALL.to_vec()), any::<bool>())
                .prop_map(|(c, s)| CapabilityStatus::new(c, s)),
            0..10,
        ),
        rounds in 1usize..4,
    ) {
        let store = MigrationOptions::new();
        let host = FixedHostSupport::capable();
        for _ in 0..rounds {
            let before: Capabilities = store.caps();
            match store.set_capabilities(&changes, &host) {
                Ok(()) => {
                    let after = store.caps();
                    prop_assert_eq!(after, before.with_changes(&changes));
                    let params = store.params();
                    let ctx = migration::options::CapsCheckContext {
                        params: &params,
                        incoming: false,
                        host: &host,
                    };
                    prop_assert!(migration::options::check_capabilities(&after, &after, &ctx).is_ok());
                }
                Err(_) => prop_assert_eq!(store.caps(), before),
            }
        }
    }
}

/// The generator must exercise both sides: enough accepted and enough refused sets.
#[test]
fn generated_updates_are_both_accepted_and_refused() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    let mut runner = TestRunner::deterministic();
    let strategy = update();
    let (mut accepted, total) = (0, 1000);
    for _ in 0..total {
        let u = strategy.new_tree(&mut runner).unwrap().current();
        if MigrationOptions::new().set_parameters(&u).is_ok() {
            accepted += 1;
        }
    }
    eprintln!("accepted {accepted} of {total}");
    assert!(
        accepted > total / 5 && accepted < total * 4 / 5,
        "accepted {accepted} of {total}"
    );
}
