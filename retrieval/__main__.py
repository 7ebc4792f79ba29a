from plumbing.process import exit_now
from retrieval.cli import main

exit_now(main())
