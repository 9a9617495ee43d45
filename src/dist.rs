//! Data parallelism across processes: the few collectives training needs, behind one trait, so
//! that the training loops never name a backend.
//!
//! A run launched as `mpirun -np N refine-poi grpo-train ...` (or `srun --mpi=pmix` under Slurm)
//! has N ranks. Every rank holds the whole model and adapter and computes the same global batch
//! order; rank r takes micro-batches (SFT) or prompts (GRPO) r, r + N, r + 2N, ... of each step.
//! The LoRA gradients and the logged statistics are summed over ranks, so every rank applies
//! the same update and the run equals a one-process run with the same global batch and seed, up
//! to the order of floating-point sums. Rank 0 alone writes the run directory (lock, logs,
//! checkpoints, validation).
//!
//! Backends: [`Single`] (one process, no MPI needed), and MPI over the system's library when the
//! binary is built with `--features mpi` ([`from_env`] picks it when a launcher started the
//! process). A binary without the feature refuses to start under a launcher with N > 1, where
//! each process would otherwise train the whole run alone.

use std::rc::Rc;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};

/// The collectives, each called by every rank in the same order (as MPI requires).
pub trait Collective {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Element-wise sum over ranks, in place: every rank gets the sums.
    fn sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    fn sum_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// Every rank's `local`, concatenated in rank order, on every rank (lengths may differ).
    fn gather_f64(&self, local: &[f64]) -> Result<Vec<f64>>;
    /// Rank 0's `bytes` on every rank.
    fn broadcast_bytes(&self, bytes: &mut Vec<u8>) -> Result<()>;
    /// Sums `grads` over ranks in place: by default through one flat f32 host buffer
    /// ([`host_sum_tensors`]); GPU tensors through NCCL with the `nccl` feature.
    fn sum_tensors(&self, grads: &mut [Tensor]) -> Result<()> {
        host_sum_tensors(self, grads)
    }
    /// Ends every rank's process at once (after an error on one rank, the others would wait
    /// forever in their next collective).
    fn abort(&self, code: i32) -> !;
}

/// Sums tensors over ranks through one flat f32 host buffer and one [`Collective::sum_f32`].
pub fn host_sum_tensors<C: Collective + ?Sized>(c: &C, grads: &mut [Tensor]) -> Result<()> {
    let mut flat = Vec::new();
    for g in grads.iter() {
        flat.extend(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
    }
    c.sum_f32(&mut flat)?;
    let mut at = 0;
    for g in grads.iter_mut() {
        let n = g.elem_count();
        *g = Tensor::from_slice(&flat[at..at + n], g.shape(), g.device())?.to_dtype(g.dtype())?;
        at += n;
    }
    Ok(())
}

/// One process: every collective is the identity.
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn sum_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn sum_f32(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn gather_f64(&self, local: &[f64]) -> Result<Vec<f64>> {
        Ok(local.to_vec())
    }
    fn broadcast_bytes(&self, _: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// A handle on the run's collective, cheap to clone; it also times the gradient all-reduce.
#[derive(Clone)]
pub struct Dist {
    inner: Rc<dyn Collective>,
}

impl Default for Dist {
    fn default() -> Self {
        Dist::single()
    }
}

impl std::fmt::Debug for Dist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Dist(rank {} of {})", self.rank(), self.size())
    }
}

impl Dist {
    pub fn single() -> Dist {
        Dist { inner: Rc::new(Single) }
    }

    pub fn new(collective: Rc<dyn Collective>) -> Dist {
        Dist { inner: collective }
    }

    pub fn rank(&self) -> usize {
        self.inner.rank()
    }

    pub fn size(&self) -> usize {
        self.inner.size()
    }

    /// Rank 0: the one that writes the run directory, the logs and the messages.
    pub fn is_writer(&self) -> bool {
        self.rank() == 0
    }

    /// Whether item `i` of a step (a micro-batch, a prompt) is this rank's.
    pub fn owns(&self, i: usize) -> bool {
        i % self.size() == self.rank()
    }

    pub fn sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.inner.sum_f64(buf)
    }

    pub fn gather_f64(&self, local: &[f64]) -> Result<Vec<f64>> {
        self.inner.gather_f64(local)
    }

    /// Rank 0's string on every rank.
    pub fn broadcast_string(&self, s: &str) -> Result<String> {
        let mut bytes = s.as_bytes().to_vec();
        self.inner.broadcast_bytes(&mut bytes)?;
        String::from_utf8(bytes).context("rank 0 sent a string that is not UTF-8")
    }

    /// Sums `grads` over ranks in place, returning the seconds it took (0 with one rank, where
    /// nothing is copied).
    pub fn sum_tensors(&self, grads: &mut [Tensor]) -> Result<f64> {
        if self.size() == 1 {
            return Ok(0.0);
        }
        let started = Instant::now();
        self.inner.sum_tensors(grads)?;
        Ok(started.elapsed().as_secs_f64())
    }

    /// Ends all ranks after an error on this one (a no-op exit with one rank).
    pub fn abort(&self, code: i32) -> ! {
        self.inner.abort(code)
    }
}

fn env_number(keys: &[&str]) -> Option<usize> {
    keys.iter().find_map(|k| std::env::var(k).ok()?.parse().ok())
}

/// The number of processes a launcher started, from its environment, if any: `mpirun`
/// (OpenMPI), or `srun --mpi=pmix` / `--mpi=pmi2` under Slurm (the step's task count).
fn launched_size() -> Option<usize> {
    env_number(&["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]).or_else(|| {
        let pmix = std::env::var_os("PMIX_RANK").is_some();
        if pmix { env_number(&["SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"]) } else { None }
    })
}

/// This process's rank among those of its node (0 without a launcher): the GPU it takes.
pub fn local_rank() -> usize {
    env_number(&["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"]).unwrap_or(0)
}

/// The run's collective: MPI when a launcher started this process (and the binary has the
/// `mpi` feature), else [`Single`].
pub fn from_env() -> Result<Dist> {
    match launched_size() {
        None | Some(0) | Some(1) => Ok(Dist::single()),
        Some(n) => launch(n),
    }
}

#[cfg(feature = "mpi")]
fn launch(n: usize) -> Result<Dist> {
    let world = mpi_backend::Mpi::init()?;
    anyhow::ensure!(world.size() == n, "the launcher's environment says {n} processes, MPI says {}", world.size());
    Ok(Dist::new(Rc::new(world)))
}

#[cfg(not(feature = "mpi"))]
fn launch(n: usize) -> Result<Dist> {
    anyhow::bail!(
        "started by an MPI launcher with {n} processes, but this binary was built without the `mpi` feature: each process would train the whole run alone. Build with `cargo build --release --features mpi` (needs OpenMPI's libopenmpi-dev and libclang), or run one process"
    )
}

#[cfg(feature = "mpi")]
mod mpi_backend {
    use super::Collective;
    use anyhow::{Context, Result, ensure};
    use mpi::collective::SystemOperation;
    use mpi::datatype::PartitionMut;
    use mpi::environment::Universe;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;

    /// MPI_COMM_WORLD over the system's MPI library; finalized when dropped.
    pub struct Mpi {
        world: SimpleCommunicator,
        /// GPU gradients' communicator, made at their first sum.
        #[cfg(feature = "nccl")]
        nccl: std::cell::OnceCell<super::nccl::Nccl>,
        // Dropped last: finalizes MPI.
        _universe: Universe,
    }

    impl Mpi {
        pub fn init() -> Result<Mpi> {
            // Funneled: only the main thread calls MPI (the compute threads never do).
            let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled).context("MPI is already initialized")?;
            let world = universe.world();
            Ok(Mpi {
                world,
                #[cfg(feature = "nccl")]
                nccl: std::cell::OnceCell::new(),
                _universe: universe,
            })
        }
    }

    impl Collective for Mpi {
        fn rank(&self) -> usize {
            self.world.rank() as usize
        }
        fn size(&self) -> usize {
            self.world.size() as usize
        }
        fn sum_f64(&self, buf: &mut [f64]) -> Result<()> {
            let send = buf.to_vec();
            self.world.all_reduce_into(&send[..], buf, SystemOperation::sum());
            Ok(())
        }
        fn sum_f32(&self, buf: &mut [f32]) -> Result<()> {
            let send = buf.to_vec();
            self.world.all_reduce_into(&send[..], buf, SystemOperation::sum());
            Ok(())
        }
        fn gather_f64(&self, local: &[f64]) -> Result<Vec<f64>> {
            let n = self.size();
            let mut counts = vec![0i32; n];
            let len = i32::try_from(local.len()).context("too much to gather")?;
            self.world.all_gather_into(&len, &mut counts[..]);
            let displs: Vec<i32> = counts.iter().scan(0, |at, &c| Some(std::mem::replace(at, *at + c))).collect();
            let total = counts.iter().map(|&c| c as usize).sum();
            let mut out = vec![0f64; total];
            let mut partition = PartitionMut::new(&mut out[..], counts, displs);
            self.world.all_gather_varcount_into(local, &mut partition);
            Ok(out)
        }
        fn broadcast_bytes(&self, bytes: &mut Vec<u8>) -> Result<()> {
            let root = self.world.process_at_rank(0);
            let mut len = bytes.len() as u64;
            root.broadcast_into(&mut len);
            ensure!(len < (1 << 31), "broadcast too large");
            bytes.resize(len as usize, 0);
            root.broadcast_into(&mut bytes[..]);
            Ok(())
        }
        fn abort(&self, code: i32) -> ! {
            self.world.abort(code)
        }
        #[cfg(feature = "nccl")]
        fn sum_tensors(&self, grads: &mut [candle_core::Tensor]) -> Result<()> {
            match grads.first().map(|g| g.device().clone()) {
                Some(device @ candle_core::Device::Cuda(_)) => {
                    let comm = match self.nccl.get() {
                        Some(c) => c,
                        None => {
                            let c = super::nccl::Nccl::init(self, &device)?;
                            self.nccl.get_or_init(|| c)
                        }
                    };
                    comm.sum_tensors(grads)
                }
                _ => super::host_sum_tensors(self, grads),
            }
        }
    }
}

/// Gradients on GPUs are summed by NCCL, on the device: the communicator is made at the first
/// sum (every rank reaches it together), from an id that rank 0 creates and MPI broadcasts.
/// Built with the `nccl` feature (it links libnccl); never run here, for want of a GPU.
#[cfg(feature = "nccl")]
mod nccl {
    use anyhow::{Context, Result, anyhow};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda::cudarc::nccl::{Comm, Id, ReduceOp};
    use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

    use super::Collective;

    pub struct Nccl {
        comm: Comm,
    }

    // SAFETY: the communicator is only used from the thread that drives training (MPI is
    // initialized `Funneled`); candle's custom-op trait asks for Send + Sync all the same.
    unsafe impl Send for Nccl {}
    unsafe impl Sync for Nccl {}

    impl Nccl {
        pub fn init(mpi: &dyn Collective, device: &Device) -> Result<Nccl> {
            let cuda = device.as_cuda_device()?;
            let mut bytes = if mpi.rank() == 0 {
                let id = Id::new().map_err(|e| anyhow!("cannot create an NCCL id: {e:?}"))?;
                id.internal().iter().map(|&c| c as u8).collect()
            } else {
                Vec::new()
            };
            mpi.broadcast_bytes(&mut bytes)?;
            let mut internal = [0 as std::ffi::c_char; 128];
            anyhow::ensure!(bytes.len() == internal.len(), "rank 0 sent an NCCL id of {} bytes", bytes.len());
            for (to, from) in internal.iter_mut().zip(&bytes) {
                *to = *from as std::ffi::c_char;
            }
            let comm = Comm::from_rank(cuda.cuda_stream(), mpi.rank(), mpi.size(), Id::uninit(internal))
                .map_err(|e| anyhow!("cannot join the NCCL communicator: {e:?}"))
                .context("NCCL (one GPU per rank: the rank's local rank picks it)")?;
            Ok(Nccl { comm })
        }

        pub fn sum_tensors(&self, grads: &mut [Tensor]) -> Result<()> {
            for g in grads.iter_mut() {
                *g = g.to_dtype(DType::F32)?.contiguous()?.apply_op1_no_bwd(self)?;
            }
            Ok(())
        }
    }

    impl CustomOp1 for Nccl {
        fn name(&self) -> &'static str {
            "nccl-all-reduce-sum"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("the NCCL sum runs on GPU tensors only")
        }

        fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
            let (start, end) = layout.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("not contiguous".into()))?;
            let src = storage.as_cuda_slice::<f32>()?.slice(start..end);
            let device = storage.device().clone();
            let mut dst = device.alloc_zeros::<f32>(end - start)?;
            self.comm.all_reduce(&src, &mut dst, &ReduceOp::Sum).map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}")))?;
            Ok((CudaStorage::wrap_cuda_slice(dst, device), layout.shape().clone()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn one_process_collectives_are_the_identity() {
        let d = Dist::single();
        assert_eq!((d.rank(), d.size(), d.is_writer()), (0, 1, true));
        assert!((0..5).all(|i| d.owns(i)));
        let mut g = vec![Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap()];
        assert_eq!(d.sum_tensors(&mut g).unwrap(), 0.0);
        assert_eq!(g[0].to_vec1::<f32>().unwrap(), [1.0, 2.0]);
        assert_eq!(d.gather_f64(&[1.0, 2.0]).unwrap(), [1.0, 2.0]);
        assert_eq!(d.broadcast_string("runs/x").unwrap(), "runs/x");
    }
}
