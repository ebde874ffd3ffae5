from nbia_sync.sim.cli import main

raise SystemExit(main())
