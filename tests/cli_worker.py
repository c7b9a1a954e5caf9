"""``python -m dreamidv_core`` for tests that start it under torchrun: the same command line, with the tiny VAE
configuration (the command line loads the released VAE size; the tests' weight files are tiny)."""
import functools
import sys

from dreamidv_core.models import vae as vae_module

vae_module.load_wan_vae = functools.partial(vae_module.load_wan_vae, config=vae_module.TINY_VAE_CONFIG)

if __name__ == "__main__":
    from dreamidv_core.cli import main

    sys.exit(main())
