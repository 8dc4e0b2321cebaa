//! `proxy-redirect demo`: placeholder
use anyhow::Result;
use clap::Args;
#[derive(Args, Debug)]
pub struct DemoArgs {}
pub fn run(_args: &DemoArgs) -> Result<()> {
    Ok(())
}
