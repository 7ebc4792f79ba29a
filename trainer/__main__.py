from plumbing.process import exit_now
from trainer.cli import main

exit_now(main())
