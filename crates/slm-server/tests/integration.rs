//! `slm serve`'s tests, one binary: each module talks to a server on a loopback port.
//! (One binary, not one per file: each links the whole dependency tree, ~60 MB in a debug build.)

mod support;

mod encoders;
mod robustness;
mod server;
