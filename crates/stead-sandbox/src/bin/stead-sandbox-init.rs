//! The sandbox init as a binary of its own: `stead-sandbox-init
//! __sandbox-init <config-fd> <status-fd>`. The agent normally re-executes
//! itself instead; this one serves the crate's tests and embedders.

fn main() {
    stead_sandbox::init_main()
}
