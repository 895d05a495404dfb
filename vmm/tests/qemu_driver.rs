//! The QEMU driver against the real default image (`scripts/build-image.sh`) under TCG: the
//! shared driver suite, the Auto probe and its cache, and spec checks.
//!
//! These tests fail, not skip, when QEMU or the image is missing. They boot real guests (about
//! 2 s of CPU each), one at a time: a lock keeps them from slowing each other down.

mod driver_suite;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use blx_vmm::image::{self, Image};
use blx_vmm::qemu::{Accel, QemuConfig, QemuDriver, qmp_execute};
use blx_vmm::{BootSpec, Driver, DriverError, DriverKind, Phase};
use driver_suite::{BOOT_WAIT, Clock, Scratch, assert_gone, desired, run_dir, wait_for};

static ONE_QEMU_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    ONE_QEMU_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The default image, or a failure that says how to get it.
fn default_image() -> Image {
    let qemu = Path::new("qemu-system-x86_64");
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(qemu).is_file()))
        .unwrap_or(false);
    assert!(
        on_path,
        "qemu-system-x86_64 not found: install qemu-system-x86 (scripts/setup.sh)"
    );
    image::load(&image::default_dir(), "default")
        .unwrap_or_else(|e| panic!("the QEMU tests need the default image: {e}"))
}

fn spec(image: &Image) -> BootSpec {
    BootSpec {
        driver: DriverKind::Qemu,
        vcpus: 1,
        memory_mib: 256,
        kernel: Some(image.kernel.clone()),
        initrd: Some(image.initrd.clone()),
        disk: None,
        cmdline: None,
        command: Vec::new(),
        ready_marker: image.ready_marker.clone(),
        boot_timeout_ms: 60_000,
    }
}

fn tcg() -> QemuDriver {
    QemuDriver::new(QemuConfig {
        accel: Accel::Tcg,
        ..QemuConfig::default()
    })
}

#[test]
fn qemu_driver_passes_the_suite() {
    let image = default_image();
    let _one = serial();
    driver_suite::suite(tcg, spec(&image));
}

#[test]
fn auto_probes_once_and_remembers() {
    driver_suite::init_tracing();
    let image = default_image();
    let _one = serial();
    // KVM on this machine cannot boot a stock kernel (docs: DESIGN.md); a host where it can
    // sets BLX_TEST_EXPECT_ACCEL=kvm.
    let expected = std::env::var("BLX_TEST_EXPECT_ACCEL")
        .ok()
        .and_then(|a| Accel::parse(&a))
        .unwrap_or(Accel::Tcg);
    let root = Scratch::new();
    let cache = root.path().join("accel");
    let config = QemuConfig {
        accel: Accel::Auto,
        accel_cache: Some(cache.clone()),
        ..QemuConfig::default()
    };
    let clock = Clock::new();

    tracing::info!("--- the first start probes KVM, falls back, and boots");
    let mut driver = QemuDriver::new(config.clone());
    assert_eq!(driver.accel(), None);
    let dir = run_dir(root.path(), "auto");
    let before = Instant::now();
    driver
        .start(&desired("auto", 1, &spec(&image)), &dir, clock.now_ms())
        .unwrap();
    tracing::info!(probe_and_start_ms = before.elapsed().as_millis(), "started");
    assert_eq!(driver.accel(), Some(expected));
    assert_eq!(
        std::fs::read_to_string(&cache).unwrap().trim(),
        expected.as_str()
    );
    let running = wait_for(&mut driver, clock, "auto", BOOT_WAIT, "running", |o| {
        o.phase == Phase::Running
    });
    tracing::info!(boot_ms = running.boot_ms, "booted after the probe");
    let status = qmp_execute(
        &dir.join("qmp.sock"),
        "query-status",
        Duration::from_secs(2),
    )
    .unwrap();
    assert_eq!(status["status"], "running");
    driver.stop("auto").unwrap();
    assert_gone(running.pid.unwrap(), &dir);
    assert!(
        leftover_probe_dirs().is_empty(),
        "probe directories left: {:?}",
        leftover_probe_dirs()
    );

    tracing::info!("--- a new driver reads the cache instead of probing");
    let mut again = QemuDriver::new(config);
    let before = Instant::now();
    let kernel = image.kernel.clone();
    let accel = again
        .probe_accel(&kernel, Some(&image.initrd), image.ready_marker.as_deref())
        .unwrap();
    assert_eq!(accel, expected);
    assert!(
        before.elapsed() < Duration::from_millis(500),
        "cache not used: {:?}",
        before.elapsed()
    );
}

#[test]
fn a_guest_kernel_panic_is_a_crash() {
    driver_suite::init_tracing();
    let image = default_image();
    let _one = serial();
    let root = Scratch::new();
    let clock = Clock::new();
    let mut driver = tcg();
    let dir = run_dir(root.path(), "panics");
    let mut panics = spec(&image);
    panics.cmdline = Some("rdinit=/no/such/init".into());
    driver
        .start(&desired("panics", 1, &panics), &dir, clock.now_ms())
        .unwrap();
    let pid = driver.poll(clock.now_ms())["panics"].pid.unwrap();
    let seen = wait_for(&mut driver, clock, "panics", BOOT_WAIT, "exited", |o| {
        matches!(o.phase, Phase::Exited { .. })
    });
    match &seen.phase {
        Phase::Exited { code: None, reason } => {
            assert!(
                reason.starts_with("guest kernel panic: Kernel panic - not syncing"),
                "{reason}"
            );
        }
        other => {
            panic!("QEMU exits cleanly on a guest panic; the driver must report a crash: {other:?}")
        }
    }
    assert_gone(pid, &dir);
    driver.stop("panics").unwrap();
}

fn leftover_probe_dirs() -> Vec<PathBuf> {
    let prefix = format!("blx-kvm-probe-{}-", std::process::id());
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect()
}

#[test]
fn specs_are_checked() {
    let image = default_image();
    let driver = tcg();
    let good = spec(&image);
    driver.validate(&good).unwrap();
    let refused = |change: &dyn Fn(&mut BootSpec)| {
        let mut spec = good.clone();
        change(&mut spec);
        match driver.validate(&spec) {
            Err(DriverError::InvalidSpec(reason)) => reason,
            other => panic!("{spec:?} accepted: {other:?}"),
        }
    };
    assert_eq!(
        refused(&|s| s.kernel = None),
        "the QEMU driver needs a kernel"
    );
    assert_eq!(
        refused(&|s| s.initrd = Some("/no/initrd".into())),
        "initrd /no/initrd not found"
    );
    assert_eq!(
        refused(&|s| s.disk = Some("/no/disk.raw".into())),
        "disk /no/disk.raw not found"
    );
    assert!(refused(&|s| s.vcpus = 0).contains("vCPUs"));
    assert!(refused(&|s| s.vcpus = 65).contains("vCPUs"));
    assert!(refused(&|s| s.memory_mib = 8).contains("memory"));
    assert!(refused(&|s| s.memory_mib = (1 << 20) + 1).contains("memory"));
    assert!(refused(&|s| s.driver = DriverKind::Process).contains("Process"));

    let missing = QemuDriver::new(QemuConfig {
        binary: "/opt/none/qemu-system-x86_64".into(),
        ..QemuConfig::default()
    });
    let err = missing.validate(&good).unwrap_err().to_string();
    assert_eq!(
        err,
        "invalid VM spec: /opt/none/qemu-system-x86_64 not found; install qemu-system-x86"
    );
}
