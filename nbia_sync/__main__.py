from nbia_sync.cli import main

raise SystemExit(main())
