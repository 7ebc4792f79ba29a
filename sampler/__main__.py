from sampler.cli import main

raise SystemExit(main())
