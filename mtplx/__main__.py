from mtplx.cli.main import main

main()
