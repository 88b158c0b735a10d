//! The memory ledger of one device: capacity (device memory × `memory_fraction`, or a CPU
//! `memory_limit`) and who holds what, by model and kind. A model's engine holds a
//! [`Reservation`]; it is released when the engine (and so its device memory) is dropped,
//! which is when the engine thread ends. Nothing is allocated here: the ledger is what the
//! server consults before loading a model, so a load that would not fit evicts idle models
//! or is refused instead of running the device out of memory.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};

/// What a reservation pays for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryKind {
    /// Model weights (measured once loaded).
    Weights,
    /// The KV cache (or per-sequence state) pool.
    Kv,
    /// Workspace of the largest step the model's config allows.
    Activations,
}

impl MemoryKind {
    pub const ALL: [MemoryKind; 3] = [MemoryKind::Weights, MemoryKind::Kv, MemoryKind::Activations];

    pub fn as_str(self) -> &'static str {
        match self {
            MemoryKind::Weights => "weights",
            MemoryKind::Kv => "kv",
            MemoryKind::Activations => "activations",
        }
    }
}

/// Bytes by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct MemoryBytes {
    pub weights: u64,
    pub kv: u64,
    pub activations: u64,
}

impl MemoryBytes {
    pub fn total(&self) -> u64 {
        self.weights + self.kv + self.activations
    }

    pub fn get(&self, kind: MemoryKind) -> u64 {
        match kind {
            MemoryKind::Weights => self.weights,
            MemoryKind::Kv => self.kv,
            MemoryKind::Activations => self.activations,
        }
    }

    fn slot(&mut self, kind: MemoryKind) -> &mut u64 {
        match kind {
            MemoryKind::Weights => &mut self.weights,
            MemoryKind::Kv => &mut self.kv,
            MemoryKind::Activations => &mut self.activations,
        }
    }
}

/// A reservation that does not fit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct OutOfMemory {
    pub device: String,
    pub requested: u64,
    pub free: u64,
    pub capacity: u64,
}

impl fmt::Display for OutOfMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} more needed but {} has {} free of {}",
            human_bytes(self.requested),
            self.device,
            human_bytes(self.free),
            human_bytes(self.capacity)
        )
    }
}

/// `1.50 GiB`, `12.0 MiB`, `512 B`.
pub fn human_bytes(b: u64) -> String {
    const K: f64 = 1024.0;
    let f = b as f64;
    if f >= K * K * K {
        format!("{:.2} GiB", f / (K * K * K))
    } else if f >= K * K {
        format!("{:.1} MiB", f / (K * K))
    } else if f >= K {
        format!("{:.1} KiB", f / K)
    } else {
        format!("{b} B")
    }
}

#[derive(Debug, Default)]
struct Book {
    held: BTreeMap<String, MemoryBytes>,
    /// The most ever held at once.
    peak: u64,
}

impl Book {
    fn used(&self) -> u64 {
        self.held.values().map(MemoryBytes::total).sum()
    }
}

/// The ledger of one device. Shared (`Arc`) by every model placed on it.
#[derive(Debug)]
pub struct DeviceLedger {
    device: String,
    capacity: u64,
    book: Mutex<Book>,
}

impl DeviceLedger {
    /// A ledger of `capacity` bytes for `device` (e.g. `cuda:0`, `cpu`).
    pub fn new(device: impl Into<String>, capacity: u64) -> Arc<DeviceLedger> {
        Arc::new(DeviceLedger { device: device.into(), capacity, book: Mutex::default() })
    }

    pub fn device(&self) -> &str {
        &self.device
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        // A panic while holding this lock cannot leave the book inconsistent (plain adds).
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn used(&self) -> u64 {
        self.book().used()
    }

    pub fn free(&self) -> u64 {
        self.capacity.saturating_sub(self.used())
    }

    /// The most bytes ever reserved at once.
    pub fn peak(&self) -> u64 {
        self.book().peak
    }

    /// What each model holds.
    pub fn snapshot(&self) -> BTreeMap<String, MemoryBytes> {
        self.book().held.clone()
    }

    /// What `model` holds (zero when nothing).
    pub fn held_by(&self, model: &str) -> MemoryBytes {
        self.book().held.get(model).copied().unwrap_or_default()
    }

    /// Reserves `bytes` for `model`, all or nothing. The reservation is returned when the
    /// returned guard is dropped.
    pub fn reserve(self: &Arc<Self>, model: &str, bytes: MemoryBytes) -> Result<Reservation, OutOfMemory> {
        let mut book = self.book();
        let used = book.used();
        if used + bytes.total() > self.capacity {
            return Err(OutOfMemory {
                device: self.device.clone(),
                requested: bytes.total(),
                free: self.capacity.saturating_sub(used),
                capacity: self.capacity,
            });
        }
        let held = book.held.entry(model.to_string()).or_default();
        for kind in MemoryKind::ALL {
            *held.slot(kind) += bytes.get(kind);
        }
        book.peak = book.peak.max(used + bytes.total());
        Ok(Reservation { ledger: self.clone(), model: model.to_string(), bytes })
    }
}

/// Memory held in a [`DeviceLedger`] until dropped.
#[derive(Debug)]
pub struct Reservation {
    ledger: Arc<DeviceLedger>,
    model: String,
    bytes: MemoryBytes,
}

impl Reservation {
    pub fn bytes(&self) -> MemoryBytes {
        self.bytes
    }

    pub fn ledger(&self) -> &Arc<DeviceLedger> {
        &self.ledger
    }

    /// Replaces the reserved amount of `kind` by a measured one. Shrinking always works;
    /// growing fails (and changes nothing) when the device has too little free.
    pub fn resize(&mut self, kind: MemoryKind, bytes: u64) -> Result<(), OutOfMemory> {
        let mut book = self.ledger.book();
        let old = self.bytes.get(kind);
        let used = book.used();
        if bytes > old && used + (bytes - old) > self.ledger.capacity {
            return Err(OutOfMemory {
                device: self.ledger.device.clone(),
                requested: bytes - old,
                free: self.ledger.capacity.saturating_sub(used),
                capacity: self.ledger.capacity,
            });
        }
        let held = book.held.entry(self.model.clone()).or_default();
        *held.slot(kind) = held.slot(kind).saturating_sub(old) + bytes;
        *self.bytes.slot(kind) = bytes;
        let used = book.used();
        book.peak = book.peak.max(used);
        Ok(())
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut book = self.ledger.book();
        if let Some(held) = book.held.get_mut(&self.model) {
            for kind in MemoryKind::ALL {
                *held.slot(kind) = held.slot(kind).saturating_sub(self.bytes.get(kind));
            }
            if held.total() == 0 {
                book.held.remove(&self.model);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(weights: u64, kv: u64, activations: u64) -> MemoryBytes {
        MemoryBytes { weights, kv, activations }
    }

    #[test]
    fn reservations_fit_or_fail_whole_and_release_on_drop() {
        let l = DeviceLedger::new("cpu", 1000);
        let a = l.reserve("a", b(400, 200, 100)).unwrap();
        assert_eq!((l.used(), l.free()), (700, 300));
        let e = l.reserve("b", b(200, 100, 1)).unwrap_err();
        assert_eq!((e.requested, e.free, e.capacity), (301, 300, 1000));
        assert_eq!(l.used(), 700, "a refused reservation takes nothing");
        let bb = l.reserve("b", b(200, 100, 0)).unwrap();
        assert_eq!(l.free(), 0);
        assert_eq!(l.held_by("a"), b(400, 200, 100));
        drop(a);
        assert_eq!(l.used(), 300);
        assert!(!l.snapshot().contains_key("a"));
        drop(bb);
        assert_eq!((l.used(), l.peak()), (0, 1000));
    }

    #[test]
    fn resize_replaces_an_estimate_by_a_measurement() {
        let l = DeviceLedger::new("cuda:0", 1000);
        let mut r = l.reserve("m", b(500, 300, 100)).unwrap();
        r.resize(MemoryKind::Weights, 450).unwrap();
        assert_eq!(l.held_by("m"), b(450, 300, 100));
        assert!(r.resize(MemoryKind::Activations, 251).is_err(), "50 free, 151 more asked");
        assert_eq!(l.held_by("m").activations, 100);
        r.resize(MemoryKind::Activations, 250).unwrap();
        assert_eq!(l.free(), 0);
        drop(r);
        assert_eq!(l.used(), 0);
    }

    #[test]
    fn two_reservations_of_one_model_add_up() {
        let l = DeviceLedger::new("cpu", 100);
        let r1 = l.reserve("m", b(10, 0, 0)).unwrap();
        let r2 = l.reserve("m", b(0, 20, 0)).unwrap();
        assert_eq!(l.held_by("m"), b(10, 20, 0));
        drop(r1);
        assert_eq!(l.held_by("m"), b(0, 20, 0));
        drop(r2);
        assert!(l.snapshot().is_empty());
    }
}
