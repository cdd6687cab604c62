from gossipnode.cli import main

main()
