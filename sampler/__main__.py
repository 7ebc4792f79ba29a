from plumbing.process import exit_now
from sampler.cli import main

exit_now(main())
