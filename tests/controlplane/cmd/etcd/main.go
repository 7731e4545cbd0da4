// Command etcd is the upstream etcd v3.5 server, the API server's storage in tests.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
