//! The sandbox init on its own: what `stead __sandbox-init` does, in a
//! binary a tenth the size of `stead`. An agent uses it when it is installed
//! beside `stead`: each sandbox's two init processes then start faster and
//! cost less memory (a large binary's relocated data is private to every
//! process that runs it).

fn main() {
    stead_sandbox::init_main()
}
