# Spark standalone daemons (master and workers): copy to $SPARK_CONF_DIR/spark-env.sh on every node.
# Start with: $SPARK_HOME/sbin/spark-daemon.sh start org.apache.spark.deploy.master.Master 1 (on the master)
#             $SPARK_HOME/sbin/spark-daemon.sh start org.apache.spark.deploy.worker.Worker 1 spark://HOST:7077
# Every value marked CHANGE ME is a placeholder for your site.
export SPARK_MASTER_HOST=10.0.0.10               # CHANGE ME: = spark_master in cluster/clusters.yaml
export SPARK_MASTER_PORT=7077
export SPARK_MASTER_WEBUI_PORT=8080
export SPARK_WORKER_CORES=16                     # CHANGE ME
export SPARK_WORKER_MEMORY=64g                   # CHANGE ME
export SPARK_LOCAL_DIRS=/mnt/spark-local         # CHANGE ME: fast local disk for shuffle
# Executors run this Python: it needs qarm-dist's dependencies (pyarrow, faiss, torch); = python in clusters.yaml.
export PYSPARK_PYTHON=/opt/qarm/.venv/bin/python # CHANGE ME
