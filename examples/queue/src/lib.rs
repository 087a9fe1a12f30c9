//! stagepipe scaled out on Redis: the queue consumer example's library, and the helpers its
//! tests and benchmarks share (a throwaway Redis server they can stop and restart).

pub mod server;
