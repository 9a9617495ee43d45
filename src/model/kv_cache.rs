//! Key/value cache for batched decoding: preallocated per layer, rows left-padded to a common
//! length, rows droppable (finished sequences stop costing compute). The G samples of a prompt
//! share one prefill, and its keys and values are stored once: a cache may start with a shared
//! prefix that each row reads from its prompt's copy, followed by the row's own positions.

use candle_core::{D, Tensor};

/// Keys and values of the prompts that several rows continue, stored once per prompt.
#[derive(Clone)]
pub(crate) struct SharedPrefix {
    /// Per layer: keys and values, each (prompts, kv_heads, len, head_dim).
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
    /// The prompt (index into the prefix) each row continues.
    of_row: Vec<usize>,
}

/// What attention reads for one layer: the rows' own keys and values, (rows, kv_heads, keys,
/// head_dim), after the shared prefix when there is one.
pub(crate) struct CachedKv {
    pub k: Tensor,
    pub v: Tensor,
    /// Prefix keys and values, (prompts, kv_heads, prefix_len, head_dim), and each row's prompt.
    pub prefix: Option<(Tensor, Tensor, Vec<usize>)>,
}

impl CachedKv {
    /// Keys and values with the prefix copied into every row: (rows, kv_heads, all keys,
    /// head_dim), for the attention paths that take one tensor per row.
    pub fn materialize(&self) -> candle_core::Result<(Tensor, Tensor)> {
        let Some((pk, pv, of_row)) = &self.prefix else { return Ok((self.k.clone(), self.v.clone())) };
        let idx = Tensor::from_vec(of_row.iter().map(|&r| r as u32).collect::<Vec<_>>(), of_row.len(), pk.device())?;
        let k = Tensor::cat(&[&pk.index_select(&idx, 0)?, &self.k], 2)?;
        let v = Tensor::cat(&[&pv.index_select(&idx, 0)?, &self.v], 2)?;
        Ok((k, v))
    }
}

pub struct KvCache {
    /// Per layer: the rows' own keys and values, each (rows, kv_heads, capacity, head_dim),
    /// valid up to `len`; they follow the shared prefix, if any.
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
    capacity: usize,
    pads: Vec<usize>,
    shared: Option<SharedPrefix>,
}

impl KvCache {
    pub fn new(num_layers: usize, capacity: usize) -> Self {
        KvCache { layers: (0..num_layers).map(|_| None).collect(), len: 0, capacity: capacity.max(1), pads: Vec::new(), shared: None }
    }

    fn prefix_len(&self) -> usize {
        self.shared.as_ref().map_or(0, |s| s.len)
    }

    /// Positions filled so far (including left padding and the shared prefix).
    pub fn len(&self) -> usize {
        self.prefix_len() + self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
    /// returns everything this layer's attention reads.
    pub(crate) fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> candle_core::Result<CachedKv> {
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
        let prefix = self.shared.as_ref().map(|s| {
            let (pk, pv) = &s.layers[layer];
            (pk.clone(), pv.clone(), s.of_row.clone())
        });
        Ok(CachedKv { k: kk.narrow(2, 0, needed)?, v: vv.narrow(2, 0, needed)?, prefix })
    }

    /// A cache holding only the given rows, in that order (rows may repeat). The shared
    /// prefix is not copied.
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
        let shared = self.shared.as_ref().map(|s| SharedPrefix { of_row: rows.iter().map(|&r| s.of_row[r]).collect(), ..s.clone() });
        Ok(KvCache { layers, len: self.len, capacity: self.capacity, pads: rows.iter().map(|&r| self.pads[r]).collect(), shared })
    }

    /// A cache whose rows continue the given prefilled prompts (`prompts`, one row each),
    /// row i continuing prompt `of_row[i]`. The prompts' keys and values (a prompt's own shared
    /// prefix included) become one shared prefix, left-padded to a common length and stored
    /// once however many rows read them; the rows get room for `extra` positions of their own.
    pub fn share(prompts: &[&KvCache], of_row: &[usize], extra: usize) -> candle_core::Result<KvCache> {
        let len = Self::check_share(prompts, of_row)?;
        let layers: candle_core::Result<Vec<_>> =
            (0..prompts.first().map_or(0, |p| p.layers.len())).map(|l| Self::shared_layer(prompts, l, len)).collect();
        Ok(Self::shared_cache(prompts, of_row, extra, len, layers?))
    }

    /// A one-row cache whose shared prefix is a compact copy of the first `len` positions of
    /// this one-row, unpadded cache, with room for `extra` positions of its own: a prompt that
    /// begins with the same `len` tokens reads their keys and values instead of recomputing them.
    pub fn continue_prefix(&self, len: usize, extra: usize) -> candle_core::Result<KvCache> {
        if self.rows() != 1 || self.pads[0] != 0 || len == 0 || len > self.len() {
            candle_core::bail!(
                "a prefix of {len} positions from a cache of {} rows and {} positions (pads {:?})",
                self.rows(),
                self.len(),
                self.pads
            );
        }
        let mut layers = Vec::with_capacity(self.layers.len());
        for layer in 0..self.layers.len() {
            let (k, v) = self.whole_row(layer)?;
            layers.push((k.narrow(2, 0, len)?.contiguous()?, v.narrow(2, 0, len)?.contiguous()?));
        }
        Ok(KvCache {
            layers: (0..layers.len()).map(|_| None).collect(),
            len: 0,
            capacity: extra.max(1),
            pads: vec![0],
            shared: Some(SharedPrefix { layers, len, of_row: vec![0] }),
        })
    }

    /// [`Self::share`] of prompts that are not needed afterwards: each prompt's own keys and
    /// values are released layer by layer as the shared prefix is built, so that the two do
    /// not both exist whole (the peak of a ranking batch).
    pub fn share_consumed(mut prompts: Vec<KvCache>, of_row: &[usize], extra: usize) -> candle_core::Result<KvCache> {
        let len = Self::check_share(&prompts.iter().collect::<Vec<_>>(), of_row)?;
        let mut layers = Vec::new();
        for layer in 0..prompts.first().map_or(0, |p| p.layers.len()) {
            layers.push(Self::shared_layer(&prompts.iter().collect::<Vec<_>>(), layer, len)?);
            for p in &mut prompts {
                p.layers[layer] = None;
            }
        }
        Ok(Self::shared_cache(&prompts.iter().collect::<Vec<_>>(), of_row, extra, len, layers))
    }

    /// The common length of the prompts a shared prefix is made of.
    fn check_share(prompts: &[&KvCache], of_row: &[usize]) -> candle_core::Result<usize> {
        let err = |m: &str| candle_core::Error::Msg(m.into());
        if prompts.iter().any(|p| p.rows() != 1) {
            return Err(err("a shared prefix is made of one-row caches"));
        }
        if of_row.iter().any(|&p| p >= prompts.len()) {
            return Err(err("a row continues a prompt that is not there"));
        }
        Ok(prompts.iter().map(|p| p.len()).max().unwrap_or(0))
    }

    /// One layer of the shared prefix: the prompts' keys and values, left-padded to `len`.
    fn shared_layer(prompts: &[&KvCache], layer: usize, len: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let (mut ks, mut vs) = (Vec::new(), Vec::new());
        for p in prompts {
            let (k, v) = p.whole_row(layer)?;
            ks.push(Self::left_pad(&k, len - p.len())?);
            vs.push(Self::left_pad(&v, len - p.len())?);
        }
        // Compact copies: a single prompt's keys would otherwise stay a view into its cache
        // (keeping the whole capacity alive), and CUDA's index_select, which reads the
        // prefix for each row, takes only contiguous tensors.
        Ok((Tensor::cat(&ks, 0)?.contiguous()?, Tensor::cat(&vs, 0)?.contiguous()?))
    }

    fn shared_cache(prompts: &[&KvCache], of_row: &[usize], extra: usize, len: usize, layers: Vec<(Tensor, Tensor)>) -> KvCache {
        let pads: Vec<usize> = prompts.iter().map(|p| p.pads[0] + len - p.len()).collect();
        KvCache {
            layers: (0..layers.len()).map(|_| None).collect(),
            len: 0,
            capacity: extra.max(1),
            pads: of_row.iter().map(|&p| pads[p]).collect(),
            shared: Some(SharedPrefix { layers, len, of_row: of_row.to_vec() }),
        }
    }

    /// One layer's keys and values of this one-row cache, its shared prefix first:
    /// (1, kv_heads, len(), head_dim).
    fn whole_row(&self, layer: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let err = || candle_core::Error::Msg("a shared prefix of an empty cache".into());
        let own = match &self.layers[layer] {
            Some((k, v)) => Some((k.narrow(2, 0, self.len)?, v.narrow(2, 0, self.len)?)),
            None if self.len == 0 => None,
            None => return Err(err()),
        };
        let prefix = match &self.shared {
            Some(s) => {
                let (pk, pv) = &s.layers[layer];
                Some((pk.narrow(0, s.of_row[0], 1)?, pv.narrow(0, s.of_row[0], 1)?))
            }
            None => None,
        };
        match (prefix, own) {
            (Some((pk, pv)), Some((k, v))) => Ok((Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?)),
            (Some(kv), None) | (None, Some(kv)) => Ok(kv),
            (None, None) => Err(err()),
        }
    }

    /// `t` after `shift` zero positions.
    fn left_pad(t: &Tensor, shift: usize) -> candle_core::Result<Tensor> {
        if shift == 0 {
            return Ok(t.clone());
        }
        let (rows, heads, _, dim) = t.dims4()?;
        Tensor::cat(&[&Tensor::zeros((rows, heads, shift, dim), t.dtype(), t.device())?, t], D::Minus2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// One prompt whose cache has room to spare: the shared prefix made of it is contiguous
    /// (a view into the cache was not, and CUDA's index_select refused it), and holds its keys.
    #[test]
    fn a_prefix_shared_from_one_prompt_is_contiguous() {
        let mut cache = KvCache::new(1, 8);
        cache.start(vec![0]);
        // Two heads: a view of 3 of 8 positions then skips positions between the heads.
        let k = Tensor::arange(0f32, 12.0, &Device::Cpu).unwrap().reshape((1, 2, 3, 2)).unwrap();
        cache.append(0, &k, &(&k * 10.0).unwrap()).unwrap();
        cache.advance(3);
        let shared = KvCache::share(&[&cache], &[0, 0], 2).unwrap();
        let (pk, pv) = &shared.shared.as_ref().unwrap().layers[0];
        assert!(pk.is_contiguous() && pv.is_contiguous());
        assert_eq!(pk.flatten_all().unwrap().to_vec1::<f32>().unwrap(), (0..12).map(|x| x as f32).collect::<Vec<_>>());
        let idx = Tensor::new(&[0u32, 0], &Device::Cpu).unwrap();
        assert_eq!(pv.index_select(&idx, 0).unwrap().dims(), &[2, 2, 3, 2]);
    }
}
