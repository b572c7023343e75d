from dataselect.cli import main

if __name__ == "__main__":  # spawned DDP ranks import this module: they must not run main
    main()
