//! Key/value cache for batched decoding: preallocated per layer, rows left-padded to a common
//! length, rows droppable (finished sequences stop costing compute) and mergeable (the G samples
//! of a prompt share one prefill).

use candle_core::{Tensor, D};

pub struct KvCache {
    /// Per layer: keys and values, each (rows, kv_heads, capacity, head_dim), valid up to `len`.
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
    capacity: usize,
    pads: Vec<usize>,
}

impl KvCache {
    pub fn new(num_layers: usize, capacity: usize) -> Self {
        KvCache { layers: (0..num_layers).map(|_| None).collect(), len: 0, capacity: capacity.max(1), pads: Vec::new() }
    }

    /// Positions filled so far (including left padding).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn rows(&self) -> usize {
        self.pads.len()
    }

    /// Left padding of each row.
    pub fn pads(&self) -> &[usize] {
        &self.pads
    }

    pub(crate) fn start(&mut self, pads: Vec<usize>) {
        self.pads = pads;
    }

    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }

    /// Writes a layer's new keys/values (rows, kv_heads, t, head_dim) after the filled part and
    /// returns views of everything filled, (rows, kv_heads, len + t, head_dim).
    pub(crate) fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        let needed = self.len + t;
        let capacity = &mut self.capacity;
        let slot = &mut self.layers[layer];
        let grow = |old: Option<&Tensor>, new: &Tensor, cap: usize, len: usize| -> candle_core::Result<Tensor> {
            let (rows, heads, _, dim) = new.dims4()?;
            let fresh = Tensor::zeros((rows, heads, cap, dim), new.dtype(), new.device())?;
            if let Some(old) = old {
                fresh.slice_set(&old.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
            }
            Ok(fresh)
        };
        if needed > *capacity {
            *capacity = needed.max(*capacity * 2);
        }
        let must_grow = match slot {
            None => true,
            Some((kk, _)) => kk.dim(2)? < *capacity,
        };
        if must_grow {
            let old = slot.take();
            let nk = grow(old.as_ref().map(|o| &o.0), k, *capacity, self.len)?;
            let nv = grow(old.as_ref().map(|o| &o.1), v, *capacity, self.len)?;
            *slot = Some((nk, nv));
        }
        let (kk, vv) = slot.as_ref().expect("slot filled above");
        kk.slice_set(&k.contiguous()?, 2, self.len)?;
        vv.slice_set(&v.contiguous()?, 2, self.len)?;
        Ok((kk.narrow(2, 0, needed)?, vv.narrow(2, 0, needed)?))
    }

    /// A cache holding only the given rows, in that order (rows may repeat).
    pub fn select_rows(&self, rows: &[usize]) -> candle_core::Result<KvCache> {
        let mut layers = Vec::with_capacity(self.layers.len());
        for slot in &self.layers {
            layers.push(match slot {
                Some((k, v)) => {
                    let idx = Tensor::from_vec(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), rows.len(), k.device())?;
                    Some((k.index_select(&idx, 0)?, v.index_select(&idx, 0)?))
                }
                None => None,
            });
        }
        Ok(KvCache { layers, len: self.len, capacity: self.capacity, pads: rows.iter().map(|&r| self.pads[r]).collect() })
    }

    /// Stacks caches row-wise, left-padding the shorter ones to a common length, with room for
    /// `extra` more positions.
    pub fn concat(parts: &[&KvCache], extra: usize) -> candle_core::Result<KvCache> {
        let len = parts.iter().map(|p| p.len).max().unwrap_or(0);
        let capacity = len + extra.max(1);
        let num_layers = parts.first().map_or(0, |p| p.layers.len());
        let mut pads = Vec::new();
        for p in parts {
            pads.extend(p.pads.iter().map(|&pad| pad + len - p.len));
        }
        let mut layers = Vec::with_capacity(num_layers);
        for layer in 0..num_layers {
            let mut ks = Vec::new();
            let mut vs = Vec::new();
            for p in parts {
                let (k, v) = p.layers[layer].as_ref().ok_or_else(|| candle_core::Error::Msg("concat of an empty cache".into()))?;
                ks.push(Self::place(k, p.len, len - p.len, capacity)?);
                vs.push(Self::place(v, p.len, len - p.len, capacity)?);
            }
            layers.push(Some((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?)));
        }
        Ok(KvCache { layers, len, capacity, pads })
    }

    /// `t`'s first `filled` positions moved right by `shift`, zero elsewhere, `capacity` long.
    fn place(t: &Tensor, filled: usize, shift: usize, capacity: usize) -> candle_core::Result<Tensor> {
        let (rows, heads, _, dim) = t.dims4()?;
        let zeros = |n: usize| Tensor::zeros((rows, heads, n, dim), t.dtype(), t.device());
        let mut pieces = Vec::new();
        if shift > 0 {
            pieces.push(zeros(shift)?);
        }
        pieces.push(t.narrow(2, 0, filled)?);
        let tail = capacity - shift - filled;
        if tail > 0 {
            pieces.push(zeros(tail)?);
        }
        Tensor::cat(&pieces, D::Minus2)
    }
}
