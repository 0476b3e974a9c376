//! Layers shared by every model family. A family file wires these together under HF weight names;
//! none of them knows which file format its weights came from.

pub mod activation;
mod aligned;
pub mod attention;
pub mod decode;
pub mod exec;
pub mod infer;
pub mod kernels;
pub mod linear;
pub mod norm;
pub mod pool;
pub mod qdot;
pub mod qmatmul;
mod qpack;
mod qpack_k;
pub mod recurrent;
pub mod rope;
pub mod vb;

pub use activation::Activation;
pub use linear::{Embedding, Linear};
pub use norm::{LayerNorm, Norm, RmsNorm};
pub use rope::{Rope, RopeScaling};
pub use vb::Vb;
