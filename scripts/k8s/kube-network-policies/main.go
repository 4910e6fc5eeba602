// kube-network-policies (SIG Network's reference NetworkPolicy implementation) for a BloomBee
// development cluster's real node, built by scripts/cluster.sh from the Go module proxy. Upstream's
// cmd/main.go with what a node that is a network namespace needs: the API server through a
// kubeconfig (upstream only knows the in-cluster service account), and SIGTERM as well as SIGINT
// removing its nftables table. Only NetworkPolicies: the alpha (Baseline)AdminNetworkPolicy APIs
// need CRDs that these clusters don't install. NRI stays as upstream runs it: containerd 1.6 has no
// NRI socket, so the plugin logs that it exited and pods are known from the API server alone (its
// Config.NRIdisabled would leave the plugin nil, which v0.8.0 dereferences for unknown addresses).
//
// The controller's nftables rules send the first packet of each connection to or from a pod that a
// policy selects to an nfqueue, and this process accepts or drops it. This machine kind's kernel
// lacks nftables' queue expression (CONFIG_NFT_QUEUE), so the build overlays google/nftables'
// expr/queue.go with expr_queue.go.overlay, which sends the same rule to the xtables NFQUEUE target
// through nft_compat.
//
// Bumping: change the version in go.mod, `go mod tidy`, and check that cmd/main.go upstream still
// builds the controller as run() below does.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/component-base/logs"
	logsapi "k8s.io/component-base/logs/api/v1"
	nodeutil "k8s.io/component-helpers/node/util"
	"k8s.io/klog/v2"
	"sigs.k8s.io/kube-network-policies/pkg/networkpolicy"
)

func main() {
	os.Exit(run())
}

func run() int {
	var (
		kubeconfig       = flag.String("kubeconfig", "", "kubeconfig of the controller's identity (required)")
		hostnameOverride = flag.String("hostname-override", "", "the Node this controller enforces policies for")
		queueID          = flag.Int("nfqueue-id", 100, "the nfqueue the rules send packets to")
		failOpen         = flag.Bool("fail-open", false, "accept packets while no controller reads the queue")
		metricsAddress   = flag.String("metrics-bind-address", "127.0.0.1:9080", "address of the metrics server")
	)
	c := logsapi.NewLoggingConfiguration()
	logsapi.AddGoFlags(c, flag.CommandLine)
	flag.Parse()
	logs.InitLogs()
	if err := logsapi.ValidateAndApply(c, nil); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	logger := klog.FromContext(ctx)

	if _, _, err := net.SplitHostPort(*metricsAddress); err != nil {
		logger.Error(err, "parsing metrics bind address", "address", *metricsAddress)
		return 1
	}
	nodeName, err := nodeutil.GetHostname(*hostnameOverride)
	if err != nil {
		logger.Error(err, "the node's name")
		return 1
	}
	config, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		logger.Error(err, "reading the kubeconfig", "path", *kubeconfig)
		return 1
	}
	config.AcceptContentTypes = "application/vnd.kubernetes.protobuf,application/json"
	config.ContentType = "application/vnd.kubernetes.protobuf"
	clientset, err := kubernetes.NewForConfig(config)
	if err != nil {
		logger.Error(err, "the API client")
		return 1
	}
	informersFactory := informers.NewSharedInformerFactory(clientset, 0)

	http.Handle("/metrics", promhttp.Handler())
	go func() {
		utilruntime.HandleError(http.ListenAndServe(*metricsAddress, nil))
	}()

	controller, err := networkpolicy.NewController(
		clientset,
		informersFactory.Networking().V1().NetworkPolicies(),
		informersFactory.Core().V1().Namespaces(),
		informersFactory.Core().V1().Pods(),
		nil, nil, nil, nil,
		networkpolicy.Config{
			FailOpen: *failOpen,
			QueueID:  *queueID,
			NodeName: nodeName,
			// The conntrack race it works around is fixed from Linux 6.12 on.
			NetfilterBug1766Fix: false,
		},
	)
	if err != nil {
		logger.Error(err, "starting the network policy controller")
		return 1
	}
	logger.Info("enforcing NetworkPolicies", "node", nodeName, "nfqueue", *queueID, "failOpen", *failOpen)
	go func() {
		utilruntime.HandleError(controller.Run(ctx))
	}()
	informersFactory.Start(ctx.Done())
	<-ctx.Done()
	// Run's deferred cleanup removes the controller's nftables table.
	time.Sleep(2 * time.Second)
	return 0
}
