//! Generated images kept for `response_format: "url"`: an in-memory store bounded in count and
//! bytes whose entries expire, served by `GET /v1/images/{id}.png`. Nothing is written to disk;
//! a restart forgets every image.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Bytes;

/// How long an image stays fetchable.
pub const IMAGE_TTL: Duration = Duration::from_secs(3600);
/// Most images kept; the oldest go first.
pub const MAX_IMAGES: usize = 1024;
/// Most PNG bytes kept; the oldest go first.
pub const MAX_BYTES: usize = 512 << 20;

struct StoredImage {
    png: Bytes,
    expires: Instant,
}

#[derive(Default)]
struct Entries {
    by_id: HashMap<String, StoredImage>,
    /// Ids oldest first (every entry expires in insertion order: one TTL for all).
    order: VecDeque<String>,
    bytes: usize,
}

impl Entries {
    fn pop_oldest(&mut self) {
        if let Some(id) = self.order.pop_front() {
            if let Some(e) = self.by_id.remove(&id) {
                self.bytes -= e.png.len();
            }
        }
    }
}

/// The store; shared by every route through `AppState::images`.
pub struct ImageStore {
    ttl: Duration,
    max_images: usize,
    max_bytes: usize,
    entries: Mutex<Entries>,
}

impl Default for ImageStore {
    fn default() -> Self {
        ImageStore::new(IMAGE_TTL, MAX_IMAGES, MAX_BYTES)
    }
}

impl ImageStore {
    pub fn new(ttl: Duration, max_images: usize, max_bytes: usize) -> ImageStore {
        ImageStore { ttl, max_images: max_images.max(1), max_bytes, entries: Mutex::default() }
    }

    /// How long a stored image stays fetchable.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Keeps `png` and returns its new random id; older images make room. An image larger than
    /// the whole store is not kept (its id then finds nothing).
    pub fn insert(&self, png: Vec<u8>) -> String {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let now = Instant::now();
        let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        while e.order.front().is_some_and(|id| e.by_id.get(id).is_none_or(|s| s.expires <= now)) {
            e.pop_oldest();
        }
        if png.len() > self.max_bytes {
            return id;
        }
        while !e.order.is_empty() && (e.order.len() >= self.max_images || e.bytes + png.len() > self.max_bytes) {
            e.pop_oldest();
        }
        e.bytes += png.len();
        e.order.push_back(id.clone());
        e.by_id.insert(id.clone(), StoredImage { png: Bytes::from(png), expires: now + self.ttl });
        id
    }

    /// The PNG stored under `id`, unless it expired or was pushed out.
    pub fn get(&self, id: &str) -> Option<Bytes> {
        let e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        e.by_id.get(id).filter(|s| s.expires > Instant::now()).map(|s| s.png.clone())
    }

    /// Images held now (expired ones included until the next insert drops them).
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_images_come_back_and_unknown_ids_do_not() {
        let s = ImageStore::default();
        let a = s.insert(vec![1, 2, 3]);
        let b = s.insert(vec![4]);
        assert_ne!(a, b);
        assert_eq!(s.get(&a).as_deref(), Some(&[1u8, 2, 3][..]));
        assert_eq!(s.get(&b).as_deref(), Some(&[4u8][..]));
        assert!(s.get("nope").is_none());
    }

    #[test]
    fn count_and_byte_bounds_evict_the_oldest() {
        let s = ImageStore::new(IMAGE_TTL, 2, 10);
        let a = s.insert(vec![0; 4]);
        let b = s.insert(vec![0; 4]);
        let c = s.insert(vec![0; 4]);
        assert!(s.get(&a).is_none(), "over the count");
        assert!(s.get(&b).is_some() && s.get(&c).is_some());
        let d = s.insert(vec![0; 8]);
        assert!(s.get(&b).is_none() && s.get(&c).is_none(), "over the bytes");
        assert!(s.get(&d).is_some());
        assert_eq!(s.len(), 1);
        let huge = s.insert(vec![0; 11]);
        assert!(s.get(&huge).is_none(), "larger than the store");
        assert!(s.get(&d).is_some(), "a refused image evicts nothing");
    }

    #[test]
    fn entries_expire() {
        let s = ImageStore::new(Duration::from_millis(20), 10, 100);
        let a = s.insert(vec![1]);
        assert!(s.get(&a).is_some());
        std::thread::sleep(Duration::from_millis(30));
        assert!(s.get(&a).is_none());
        s.insert(vec![2]);
        assert_eq!(s.len(), 1, "the expired entry is dropped on insert");
    }
}
