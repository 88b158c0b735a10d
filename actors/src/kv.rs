//! The KV block pool: fixed-size blocks of cache slots handed to sequences and taken back.
//! Only bookkeeping lives here; the engine owns the tensors the block ids index.

/// A free list of KV block ids.
#[derive(Debug, Clone)]
pub struct KvBlockPool {
    block_size: usize,
    total: usize,
    /// Free ids, popped from the end; kept so that low ids are handed out first.
    free: Vec<u32>,
}

impl KvBlockPool {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "block_size must be positive");
        KvBlockPool { block_size, total: num_blocks, free: (0..num_blocks as u32).rev().collect() }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn total(&self) -> usize {
        self.total
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    pub fn num_used(&self) -> usize {
        self.total - self.free.len()
    }

    /// Blocks needed to hold `tokens` positions.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Grows `table` so it covers `tokens` positions. All or nothing: on failure `table` and the
    /// pool are unchanged and the number of missing blocks is returned.
    pub fn grow(&mut self, table: &mut Vec<u32>, tokens: usize) -> Result<(), usize> {
        let need = self.blocks_for(tokens).saturating_sub(table.len());
        if need > self.free.len() {
            return Err(need - self.free.len());
        }
        for _ in 0..need {
            table.push(self.free.pop().expect("checked above"));
        }
        Ok(())
    }

    /// Returns every block of `table` to the pool and empties it.
    pub fn release(&mut self, table: &mut Vec<u32>) {
        debug_assert!(self.free.len() + table.len() <= self.total, "double free of KV blocks");
        self.free.extend(table.drain(..).rev());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_by_whole_blocks_and_releases() {
        let mut pool = KvBlockPool::new(4, 16);
        let mut t = Vec::new();
        pool.grow(&mut t, 1).unwrap();
        assert_eq!(t, vec![0]);
        pool.grow(&mut t, 16).unwrap();
        assert_eq!(t.len(), 1, "16 positions fit one block");
        pool.grow(&mut t, 17).unwrap();
        assert_eq!(t, vec![0, 1]);
        assert_eq!(pool.num_used(), 2);
        pool.release(&mut t);
        assert!(t.is_empty());
        assert_eq!(pool.num_free(), 4);
    }

    #[test]
    fn grow_is_all_or_nothing() {
        let mut pool = KvBlockPool::new(3, 4);
        let mut a = Vec::new();
        pool.grow(&mut a, 8).unwrap();
        let mut b = Vec::new();
        assert_eq!(pool.grow(&mut b, 9), Err(2));
        assert!(b.is_empty());
        assert_eq!(pool.num_free(), 1);
        pool.grow(&mut b, 4).unwrap();
        assert_eq!(pool.num_free(), 0);
    }
}
