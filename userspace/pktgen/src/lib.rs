//! What the generator shares with the bench: sending frames through an AF_PACKET socket.

pub mod packet;
